"""Gates: whether Eq. 1 can guide SEGA on a task, measured on its training split before training.

GEM's stage B trusts the Eq. 1 score to rank a prompt's sampled candidates. Three numbers say
whether that trust is earned here, before any compute is spent on SEGA:

1. ``eq1_pair_accuracy``: on the labelled pairs, how often the Eq. 1 score of the chosen
   response (teacher-forced) beats the rejected one's; ``logp_pair_accuracy`` beside it is the
   same with log π, the signal DPO trains on.
2. ``rank_correlation``: over sampled candidates of the training prompts, the Spearman rank
   correlation between Eq. 1 score and correctness (the task's answer), averaged over the
   groups that hold both a correct and a wrong candidate (in the others it is undefined, and
   SEGA's advantages cannot point at correctness either).
3. ``truncated_share``: the share of candidates cut off by ``gen_max_new_tokens`` before EOS
   (``length_p90`` beside it: what a limit keeping about 10 % cut off would be).

:func:`greedy_task_accuracy` is the task's own metric: how often the greedy completion states
the reference answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gem_fast.config import SamplingConfig, SegaConfig
from gem_fast.data import PreferencePair, encode_pairs, encode_prompts
from gem_fast.logprobs import response_logprob_entropy
from gem_fast.sampling import sample_group
from gem_fast.data.synthetic import final_answer
from gem_fast.scoring import answer_span, entropy_score

__all__ = ["Gates", "pair_scores", "spearman", "candidate_gates", "greedy_completions", "greedy_task_accuracy"]


@dataclass(frozen=True)
class Gates:
    """The three gates (see the module docstring) and the counts behind them."""

    eq1_pair_accuracy: float
    logp_pair_accuracy: float
    pairs: int
    rank_correlation: float
    informative_groups: int
    correct_share: float
    truncated_share: float
    length_p90: float  # tokens per candidate, 90th percentile (a cut-off one counts gen_max_new_tokens)
    candidates: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The gates as they are printed before training."""
        return [
            f"gate 1, Eq. 1 preference accuracy on {self.pairs} labelled pairs: {100 * self.eq1_pair_accuracy:.1f}% "
            f"(log pi: {100 * self.logp_pair_accuracy:.1f}%)",
            f"gate 2, rank correlation of Eq. 1 with correctness: {self.rank_correlation:+.3f} over "
            f"{self.informative_groups} groups with right and wrong candidates ({100 * self.correct_share:.1f}% of "
            f"{self.candidates} candidates right)" if not math.isnan(self.correct_share) else
            "gate 2, rank correlation of Eq. 1 with correctness: not measured (rows without an 'answer')",
            f"gate 3, candidates cut off by the token limit: {100 * self.truncated_share:.1f}% "
            f"(90th percentile length {self.length_p90:.0f} tokens)",
        ]


@torch.no_grad()
def pair_scores(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], sega: SegaConfig, *,
    chat_template: bool, max_length: int = 1024, batch_size: int = 8, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced Eq. 1 scores and log π of each pair's responses: two float32 [n, 2] (chosen, rejected).

    One forward per batch gives both: the fused kernel returns each response token's log-prob and
    entropy; the answer span follows ``sega`` exactly as SEGA scores its candidates.
    """
    device = next(model.parameters()).device
    eq1, logp = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = encode_pairs(tokenizer, chunk, max_length=max_length, chat_template=chat_template).to(device)
        token_logp, entropy = response_logprob_entropy(model, batch, backend=backend)
        valid = batch.response_mask[:, 1:]
        final = answer_span(sega, batch.input_ids[:, 1:], valid, tokenizer)
        scores = entropy_score(entropy, final, valid, lambda_fork=sega.lambda_fork, top_m=sega.top_m,
                               final_weight=sega.final_weight)
        n = len(chunk)  # rows: the chunk's chosen responses, then its rejected ones
        eq1.append(scores.view(2, n).T.cpu())
        logp.append(token_logp.sum(-1).view(2, n).T.float().cpu())
    return torch.cat(eq1), torch.cat(logp)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` [n] along its last dim, tied values sharing their mean rank."""
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)
    tied = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return below + (tied + 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two [n] tensors (ties: mean ranks); nan when either is constant."""
    rx, ry = (_average_ranks(v.double()) for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


@torch.no_grad()
def _sample_answers(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, k: int, max_new_tokens: int,
    temperature: float, top_p: float, chat_template: bool, max_length: int, generator: torch.Generator | None,
) -> tuple[Any, list[str]]:
    """k candidates per prompt (prompt-major) and their decoded texts."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in encode_prompts(tokenizer, prompts, max_length=max_length,
                                                       chat_template=chat_template))
    out = sample_group(model, ids, mask, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       generator=generator, progress=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return out, tokenizer.batch_decode(out.sequences.masked_fill(~out.mask, pad).tolist(), skip_special_tokens=True)


def candidate_gates(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], sampling: SamplingConfig,
    sega: SegaConfig, *, chat_template: bool, max_length: int = 1024, batch_size: int = 4, seed: int = 0,
    backend: str = "auto",
) -> Gates:
    """The gates on labelled ``pairs``; the candidates are drawn as SEGA draws them (``sampling``: k, length,
    temperature, top-p) and scored by ``sega``. Gate 2 needs every pair's ``answer`` (the built-in tasks have
    one, human preference sets do not): without, its figures are nan and 0."""
    answers = [p.answer for p in pairs]
    checkable = all(a is not None for a in answers)
    eq1, logp = pair_scores(model, tokenizer, pairs, sega, chat_template=chat_template, max_length=max_length,
                            backend=backend)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    correlations, correct, truncated, lengths = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out, texts = _sample_answers(
            model, tokenizer, [p.prompt for p in chunk], k=sampling.k, max_new_tokens=sampling.gen_max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, chat_template=chat_template,
            max_length=max_length, generator=generator)
        scores = entropy_score(out.token_entropy, answer_span(sega, out.sequences, out.mask, tokenizer), out.mask,
                               lambda_fork=sega.lambda_fork, top_m=sega.top_m, final_weight=sega.final_weight
                               ).view(len(chunk), sampling.k).cpu()
        ended = ((out.sequences == tokenizer.eos_token_id) & out.mask).any(-1).cpu()
        if checkable:
            right = torch.tensor([final_answer(t) == answers[start + i // sampling.k] for i, t in enumerate(texts)],
                                 dtype=torch.float64).view(len(chunk), sampling.k)
            correlations += [spearman(s, r) for s, r in zip(scores, right) if 0 < r.sum() < sampling.k]
            correct.append(right.flatten())
        truncated.append(~ended)
        lengths.append(out.mask.sum(-1).cpu().double())
    truncated_all = torch.cat(truncated)
    return Gates(
        eq1_pair_accuracy=float((eq1[:, 0] > eq1[:, 1]).double().mean()),
        logp_pair_accuracy=float((logp[:, 0] > logp[:, 1]).double().mean()),
        pairs=len(pairs),
        rank_correlation=float(torch.tensor(correlations).mean()) if correlations else float("nan"),
        informative_groups=len(correlations),
        correct_share=float(torch.cat(correct).mean()) if checkable else float("nan"),
        truncated_share=float(truncated_all.double().mean()),
        length_p90=float(torch.quantile(torch.cat(lengths), 0.9)),
        candidates=truncated_all.numel(),
    )


def greedy_completions(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, chat_template: bool,
    max_length: int = 1024, batch_size: int = 32,
) -> list[str]:
    """The greedy (argmax) completion of each prompt, decoded without special tokens; batched."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts += _sample_answers(
            model, tokenizer, prompts[start : start + batch_size], k=1, max_new_tokens=max_new_tokens,
            temperature=0.0, top_p=1.0, chat_template=chat_template, max_length=max_length, generator=None)[1]
    return texts


def greedy_task_accuracy(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
    max_new_tokens: int, chat_template: bool, max_length: int = 1024, batch_size: int = 32,
) -> float:
    """Share of ``prompts`` whose greedy completion states the reference answer after its last ``Answer:``."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    texts = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat_template=chat_template,
                               max_length=max_length, batch_size=batch_size)
    return sum(final_answer(t) == a for t, a in zip(texts, answers)) / len(prompts)
