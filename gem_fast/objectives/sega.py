"""SEGA (GEM stage B) as a training objective: sample -> score -> rank -> advantages -> token weights.

Each micro-step samples k candidates per prompt from the current policy (prompt KV cache shared),
scores them with Eq. 1 on the answer span, optionally turns the token-level comparisons into
ratings (Bradley-Terry or TrueSkill over :func:`gem_fast.ranking.entropy_wins`), maps those to
group advantages (:func:`gem_fast.sega.sega_advantages`) and trains on the candidates with
per-token weights ``A_i / B`` (Eq. 2, :func:`gem_fast.sega.sega_token_weights`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from gem_fast.config import SegaConfig
from gem_fast.data import encode_prompts, join_prompt_and_generation, load_prompts
from gem_fast.objectives.base import Objective
from gem_fast.policy import MicroBatch, PolicyLoss, StepBatches
from gem_fast.ranking import candidate_ratings, entropy_wins
from gem_fast.sampling import GroupSample
from gem_fast.scoring import entropy_score, final_mask_from_marker, final_mask_last_fraction, top_m_mask
from gem_fast.sega import sega_advantages, sega_token_weights

__all__ = ["SEGA", "STATS", "SampleLog", "answer_span"]

STATS = ("score_mean", "no_answer_frac", "adv_abs_mean", "entropy_mean", "gen_len_mean")
"""The step statistics SEGA logs (means over the step's prompts, then over ranks)."""


class SEGA(Objective):
    """Self-evaluated group advantages on k sampled candidates per prompt (sampling and sega sections)."""

    samples: SampleLog | None = None

    @staticmethod
    def read_rows(path: str) -> list[str]:
        """The prompts of ``path``: prompt-only rows (unlabelled prompts) or preference rows, whose answers go unused."""
        return load_prompts(path)

    def prepare(self, policy: PolicyLoss, out_dir: Path) -> None:
        """Every ``log_samples_every`` steps rank 0 logs its candidates to ``out_dir/samples.jsonl``."""
        if self.cfg.sega.log_samples_every > 0:
            self.samples = SampleLog(out_dir / "samples.jsonl")

    def step_batches(self, policy: PolicyLoss, step: int) -> StepBatches:
        """``grad_accum`` micro-batches of ``batch_size × k`` candidate rows, weighted ``A_i / B``.

        B counts the prompts of the global step; FSDP averages gradients over ranks, so each rank
        divides by its own share ``batch_size × grad_accum``. Sampling draws from a generator seeded
        by (seed, step, rank), so a resumed run samples what the uninterrupted run did.
        """
        run, sampling, env = self.cfg.run, self.cfg.sampling, self.env
        generator = torch.Generator(env.device).manual_seed(run.seed * 1_000_003 + step * 1009 + env.rank)
        prompts_per_rank = run.batch_size * run.grad_accum
        micro_batches, stats, samples = [], [], []
        log_samples = env.rank == 0 and self.samples is not None and (step + 1) % self.cfg.sega.log_samples_every == 0
        policy.eval()
        for micro in self.micro_steps(step, "sampling, scoring"):  # a signal stops it between micro-steps
            prompts = self.micro_pairs(step, micro)
            prompt_ids, prompt_mask = (t.to(env.device) for t in encode_prompts(
                self.tokenizer, prompts, max_length=run.max_length, chat_template=run.chat_template))
            out = policy.sample(
                prompt_ids, prompt_mask, k=sampling.k, max_new_tokens=sampling.gen_max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, generator=generator,
                progress=None if self.progress else False,  # its bar over tokens: on a terminal only
            )
            scores, ratings = self.rate(out, len(prompts))
            adv = sega_advantages(ratings, mapping=self.cfg.sega.reward_mapping,
                                  temperature=self.cfg.sega.reward_temperature)
            if self.cfg.sega.shuffle_advantages:
                adv = _shuffled_within_groups(adv, run.seed, step, env.rank, micro)
            batch = join_prompt_and_generation(prompt_ids, prompt_mask, out.sequences, out.mask)
            weights = sega_token_weights(adv, prompts_per_rank, batch.input_ids.shape[1] - 1)
            micro_batches.append(MicroBatch(batch, weights))
            stats.append(_statistics(scores, adv, out))
            if log_samples:
                samples += _sample_records(self.tokenizer, prompts, out, scores, adv)
        policy.train()
        if samples:
            self.samples.append(step + 1, samples)
        return micro_batches, dict(zip(STATS, torch.stack(stats).mean(0)))

    def rate(self, out: GroupSample, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 scores [prompts, k] (``-inf``: no answer tokens) and the ratings the reward mapping
        receives: the scores themselves (``ranking`` "score"), or Bradley-Terry / TrueSkill ratings
        fitted to the token-level entropy comparisons of each group."""
        sega, k = self.cfg.sega, self.cfg.sampling.k
        final = answer_span(sega, out.sequences, out.mask, self.tokenizer)
        scores = entropy_score(out.token_entropy, final, out.mask, lambda_fork=sega.lambda_fork,
                               top_m=sega.top_m).view(prompts, k)
        if sega.ranking == "score":
            return scores, scores
        final = final & out.mask
        fork = top_m_mask(out.token_entropy, out.mask & ~final, sega.top_m)
        wins = entropy_wins(*(t.view(prompts, k, -1) for t in (out.token_entropy, final, fork)),
                            lambda_fork=sega.lambda_fork)
        ratings = candidate_ratings(scores, method=sega.ranking, wins=wins)
        # A candidate without an answer keeps -inf, so the reward mapping's rule for it applies.
        return scores, ratings.masked_fill(~torch.isfinite(scores), float("-inf"))


def answer_span(sega: SegaConfig, sequences: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Bool [..., T]: the tokens Eq. 1 scores as the answer, per ``sega.final_span``: after "Answer:" / "####"
    (else, with ``marker_fallback``, the last ``final_fraction``; without, none: score -inf), or the last fraction."""
    if sega.final_span == "marker":
        return final_mask_from_marker(sequences, mask, tokenizer,
                                      fallback="last_fraction" if sega.marker_fallback else None,
                                      fallback_value=sega.final_fraction)
    return final_mask_last_fraction(mask, sega.final_fraction)


def _shuffled_within_groups(adv: torch.Tensor, seed: int, step: int, rank: int, micro: int) -> torch.Tensor:
    """``adv`` [B, k] with each row permuted at random; its own CPU generator, so sampling draws what it would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank * 31 + micro + 7)
    order = torch.rand(adv.shape, generator=generator).argsort(-1).to(adv.device)
    return adv.gather(-1, order)


def _statistics(scores: torch.Tensor, adv: torch.Tensor, out: GroupSample) -> torch.Tensor:
    """The :data:`STATS` of one micro-step, [5] float32."""
    finite = torch.isfinite(scores)
    valid = out.mask.float()
    return torch.stack([
        scores.masked_fill(~finite, 0).sum() / finite.sum().clamp(min=1),
        1 - finite.float().mean(),
        adv.abs().mean(),
        (out.token_entropy * valid).sum() / valid.sum().clamp(min=1),
        valid.sum(-1).mean(),
    ])


def _sample_records(tokenizer: Any, prompts: list[str], out: GroupSample, scores: torch.Tensor, adv: torch.Tensor
                    ) -> list[dict[str, Any]]:
    """One record per prompt: its k candidates' text, Eq. 1 scores (None: no answer, -inf) and advantages."""
    k = scores.shape[1]
    texts = tokenizer.batch_decode([row[keep].tolist() for row, keep in zip(out.sequences.cpu(), out.mask.cpu())],
                                   skip_special_tokens=True)
    finite = torch.isfinite(scores)
    score_lists = torch.where(finite, scores, 0.0).tolist()
    return [{"prompt": prompt, "candidates": texts[b * k : (b + 1) * k],
             "scores": [s if ok else None for s, ok in zip(score_lists[b], finite[b].tolist())],
             "advantages": adv[b].tolist()} for b, prompt in enumerate(prompts)]


class SampleLog:
    """``samples.jsonl``: per logged step, one line per prompt of rank 0 with ``step`` (1-based, as in
    ``metrics.jsonl``), ``prompt``, ``candidates`` (text), ``scores`` and ``advantages`` (k each)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._first = True

    def append(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append ``records`` of optimizer step ``step``. The first append of a run drops lines of this step
        and later ones (a resumed run samples them again; a fresh run starts at step 1)."""
        if self._first and self.path.exists():
            self.path.write_text("".join(line + "\n" for line in self.path.read_text().splitlines()
                                         if _step_of(line) < step))
        self._first = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.writelines(json.dumps({"step": step, **r}) + "\n" for r in records)


def _step_of(line: str) -> float:
    """The step of a samples.jsonl line; a torn line (a killed write) counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
