"""SEGA (GEM stage B) as a training objective: sample -> score -> rank -> advantages -> token weights.

Each micro-step samples k candidates per prompt from the current policy (prompt KV cache shared),
scores them with Eq. 1 on the answer span, optionally turns the token-level comparisons into
ratings (Bradley-Terry or TrueSkill over :func:`gem_fast.ranking.entropy_wins`), maps those to
group advantages (:func:`gem_fast.advantages.sega_advantages`, the ``trim`` lowest at 0) and trains on the
group's members with per-token weights ``A_i / B`` (Eq. 2, :func:`gem_fast.advantages.sega_token_weights`).

Human-anchored groups (``anchor_weight`` > 0): a preference row's group is its k candidates followed by
the human chosen and rejected responses (teacher-forced for their entropies under the same policy),
and the ranking gets ``anchor_weight`` extra wins of chosen over rejected
(:func:`gem_fast.ranking.anchor_human_pair`); advantages and the loss cover all k + 2. Prompt-only rows
keep k-member groups, so one micro-step can hold both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import torch
import torch.nn.functional as F

from gem_fast.data import PreferencePair, encode_prompts, join_prompt_and_generation, load_group_rows
from gem_fast.objectives.base import Objective
from gem_fast.policy import MicroBatch, PolicyLoss, StepBatches
from gem_fast.ranking import anchor_human_pair, candidate_ratings, entropy_wins
from gem_fast.advantages import sega_advantages, sega_token_weights
from gem_fast.reporting import JsonlLog
from gem_fast.scoring import answer_span, entropy_score, top_m_mask

__all__ = ["SEGA", "STATS", "Groups", "Row", "row_prompt"]

STATS = ("score_mean", "no_answer_frac", "adv_abs_mean", "entropy_mean", "gen_len_mean")
"""The step statistics SEGA logs (means over the step's prompts, then over ranks)."""

Row = Union[str, PreferencePair]
"""A SEGA training row: a prompt alone, or a labelled preference row (its human pair can anchor its group)."""


def row_prompt(row: Row) -> str:
    """The prompt of a SEGA row."""
    return row if isinstance(row, str) else row.prompt


@dataclass(frozen=True)
class Groups:
    """The members of B groups, prompt-major: group b's ``sizes[b]`` rows are its k sampled candidates, then,
    where ``anchored[b]``, its human chosen and rejected responses.

    ``sequences`` [N, T] int64 response tokens, ``token_entropy`` [N, T] float32 (the sampler's, or
    teacher-forced for the human rows), ``mask`` [N, T] bool valid tokens; ``sizes`` [B] int64 (k or k + 2).
    """

    sequences: torch.Tensor
    token_entropy: torch.Tensor
    mask: torch.Tensor
    sizes: torch.Tensor
    anchored: tuple[bool, ...]

    def classes(self) -> Iterator[tuple[torch.Tensor, bool]]:
        """For groups of one kind (plain, anchored) at a time: their rows ``[n, size]`` int64 and the kind."""
        starts = self.sizes.cumsum(0) - self.sizes
        for anchored in (False, True):
            index = [b for b, a in enumerate(self.anchored) if a == anchored]
            if index:
                size = int(self.sizes[index[0]])
                yield starts[index].unsqueeze(1) + torch.arange(size), anchored

    def rows(self, index: torch.Tensor, anchored: bool) -> Groups:
        """The member rows ``index`` [n, size] as n groups of one kind (from :meth:`classes`)."""
        flat = index.flatten()
        return Groups(self.sequences[flat], self.token_entropy[flat], self.mask[flat],
                      torch.full((index.shape[0],), index.shape[1]), (anchored,) * index.shape[0])


class SEGA(Objective):
    """Self-evaluated group advantages on k sampled candidates per prompt (sampling and sega sections)."""

    samples: JsonlLog | None = None

    @staticmethod
    def read_rows(path: str) -> list[Row]:
        """Prompt-only rows (unlabelled prompts) and preference rows; the human responses of the latter join
        their group with ``anchor_weight`` > 0 and go unused otherwise."""
        return load_group_rows(path)

    def prepare(self, policy: PolicyLoss, out_dir: Path) -> None:
        """Every ``log_samples_every`` steps rank 0 logs its candidates to ``out_dir/samples.jsonl``: one line
        per prompt with ``step`` (1-based, as in ``metrics.jsonl``), ``prompt``, ``candidates`` (text),
        ``scores``, ``advantages`` and ``anchored`` (:func:`_sample_records`). Its first write drops the
        lines of that step and later ones (a resumed run samples them again; a fresh run starts at step 1)."""
        if self.cfg.sega.log_samples_every > 0:
            self.samples = JsonlLog(out_dir / "samples.jsonl")

    def generator(self, step: int) -> torch.Generator:
        """The sampling generator of optimizer step ``step``, seeded by (seed, step, rank): a resumed run
        samples what the uninterrupted run did."""
        return torch.Generator(self.env.device).manual_seed(self.cfg.run.seed * 1_000_003 + step * 1009
                                                            + self.env.rank)

    def step_batches(self, policy: PolicyLoss, step: int) -> StepBatches:
        """``grad_accum`` micro-batches of each prompt's group members (k, or k + 2 anchored), weighted ``A_i / B``.

        B counts the prompts of the global step; FSDP averages gradients over ranks, so each rank
        divides by its own share ``batch_size × grad_accum``.
        """
        run, sega, env = self.cfg.run, self.cfg.sega, self.env
        generator = self.generator(step)
        prompts_per_rank = run.batch_size * run.grad_accum
        micro_batches, stats, samples = [], [], []
        log_samples = env.rank == 0 and self.samples is not None and (step + 1) % sega.log_samples_every == 0
        policy.eval()
        for micro in self.micro_steps(step, "sampling, scoring"):  # a signal stops it between micro-steps
            rows = self.micro_pairs(step, micro)
            prompt_ids, prompt_mask, groups = self.groups(policy, rows, generator)
            scores, ratings = self.rate_groups(groups)
            adv = torch.zeros_like(ratings)
            for index, anchored in groups.classes():
                adv_class = sega_advantages(ratings[index], mapping=sega.reward_mapping,
                                            temperature=sega.reward_temperature, trim=sega.trim)
                if sega.shuffle_advantages:
                    adv_class = _shuffled_within_groups(adv_class, run.seed, step, env.rank, micro, anchored)
                adv[index] = adv_class
            batch = join_prompt_and_generation(prompt_ids, prompt_mask, groups.sequences, groups.mask, groups.sizes)
            weights = sega_token_weights(adv, prompts_per_rank, batch.input_ids.shape[1] - 1)
            micro_batches.append(MicroBatch(batch, weights))
            stats.append(_statistics(scores, adv, groups))
            if log_samples:
                samples += _sample_records(self.tokenizer, [row_prompt(r) for r in rows], groups, scores, adv)
        policy.train()
        if samples:
            self.samples.write([{"step": step + 1, **r} for r in samples])
        return micro_batches, dict(zip(STATS, torch.stack(stats).mean(0)))

    def groups(self, policy: PolicyLoss, rows: list[Row], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, Groups]:
        """The prompts of ``rows`` encoded (ids and mask [B, P], left-padded) and their groups: k candidates
        sampled from ``policy``, then for each preference row (with ``anchor_weight`` > 0) its human pair."""
        run, sampling = self.cfg.run, self.cfg.sampling
        prompt_ids, prompt_mask = (t.to(self.env.device) for t in encode_prompts(
            self.tokenizer, [row_prompt(r) for r in rows], max_length=run.max_length, chat_template=run.chat_template))
        out = policy.sample(
            prompt_ids, prompt_mask, k=sampling.k, max_new_tokens=sampling.gen_max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, generator=generator,
            progress=None if self.progress else False,  # its bar over tokens: on a terminal only
        )
        k, b = sampling.k, len(rows)
        plain = Groups(out.sequences, out.token_entropy, out.mask, torch.full((b,), k), (False,) * b)
        if self.cfg.sega.anchor_weight == 0:
            return prompt_ids, prompt_mask, plain
        labelled = [i for i, r in enumerate(rows) if isinstance(r, PreferencePair)]
        if not labelled and not self.env.sharded:
            return prompt_ids, prompt_mask, plain
        # Under FSDP every rank runs the teacher-forced pass each micro-step: one without a labelled row
        # scores its first prompt's chosen response and drops the result.
        human = [rows[i] for i in labelled] or [PreferencePair(row_prompt(rows[0]), "x", "x")]
        sequences, mask = self._human_tokens(human, prompt_ids.device)
        picked = torch.tensor(labelled or [0], device=prompt_ids.device)
        batch = join_prompt_and_generation(prompt_ids[picked], prompt_mask[picked], sequences, mask)
        _, entropy = policy.response_logprob_entropy(batch, temperature=sampling.temperature or 1.0)
        if not labelled:
            return prompt_ids, prompt_mask, plain
        # Response token t sits at column P + t and is predicted from position P - 1 + t.
        entropy = entropy[:, prompt_ids.shape[1] - 1:].float() * mask
        width = max(out.sequences.shape[1], sequences.shape[1])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def widen(t: torch.Tensor, value: Any) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        slot = {row: j for j, row in enumerate(labelled)}
        order = []
        for i in range(b):
            order += range(i * k, (i + 1) * k)
            if i in slot:
                order += [b * k + 2 * slot[i], b * k + 2 * slot[i] + 1]
        order_t = torch.tensor(order, device=prompt_ids.device)
        anchored = tuple(i in slot for i in range(b))
        return prompt_ids, prompt_mask, Groups(
            torch.cat((widen(out.sequences, pad), widen(sequences, pad)))[order_t],
            torch.cat((widen(out.token_entropy, 0.0), widen(entropy, 0.0)))[order_t],
            torch.cat((widen(out.mask, False), widen(mask, False)))[order_t],
            torch.tensor([k + 2 * a for a in anchored]), anchored)

    def _human_tokens(self, pairs: list[PreferencePair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's chosen then rejected response as generated tokens (EOS appended, at most ``max_length``):
        ids [2n, R] right-padded and their mask, rows chosen_0, rejected_0, chosen_1, ..."""
        eos, limit = self.tokenizer.eos_token_id, self.cfg.run.max_length
        ids = [self.tokenizer.encode(text, add_special_tokens=False)[: limit - 1] + [eos]
               for p in pairs for text in (p.chosen, p.rejected)]
        width = max(map(len, ids))
        sequences = torch.full((len(ids), width), eos, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            sequences[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        return sequences.to(device), mask.to(device)

    def rate_groups(self, groups: Groups) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 scores and ratings (see :meth:`rate`) of every member, two [N] float32 in member order."""
        scores = torch.empty(groups.mask.shape[0], device=groups.mask.device)
        ratings = torch.empty_like(scores)
        for index, anchored in groups.classes():
            scores[index], ratings[index] = self.rate(groups.rows(index, anchored))
        return scores, ratings

    def rate(self, groups: Groups) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 scores [n, size] (``-inf``: no answer tokens) of n groups of one size and kind, and the ratings
        the reward mapping receives: the scores themselves (``ranking`` "score"), or Bradley-Terry / TrueSkill
        ratings fitted to the token-level entropy comparisons of each group, anchored groups with the human
        chosen response (member size - 2) given ``anchor_weight`` wins over the rejected one (size - 1)."""
        sega = self.cfg.sega
        n, size = groups.sizes.shape[0], int(groups.sizes[0])
        final = answer_span(sega, groups.sequences, groups.mask, self.tokenizer)
        scores = entropy_score(groups.token_entropy, final, groups.mask, lambda_fork=sega.lambda_fork,
                               top_m=sega.top_m, final_weight=sega.final_weight).view(n, size)
        if sega.ranking == "score":
            return scores, scores
        final = final & groups.mask
        fork = top_m_mask(groups.token_entropy, groups.mask & ~final, sega.top_m)
        wins = entropy_wins(*(t.view(n, size, -1) for t in (groups.token_entropy, final, fork)),
                            lambda_fork=sega.lambda_fork, final_weight=sega.final_weight)
        if groups.anchored[0]:
            wins = anchor_human_pair(wins, torch.full((n,), size - 2, device=wins.device),
                                     torch.full((n,), size - 1, device=wins.device), sega.anchor_weight)
        ratings = candidate_ratings(scores, method=sega.ranking, wins=wins)
        # A candidate without an answer keeps -inf, so the reward mapping's rule for it applies.
        return scores, ratings.masked_fill(~torch.isfinite(scores), float("-inf"))


def _shuffled_within_groups(adv: torch.Tensor, seed: int, step: int, rank: int, micro: int, anchored: bool
                            ) -> torch.Tensor:
    """``adv`` [B, size] with each row permuted at random; its own CPU generator, so sampling draws what it would."""
    salt = 500_009 if anchored else 0  # the two kinds of group draw apart
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank * 31 + micro + 7 + salt)
    order = torch.rand(adv.shape, generator=generator).argsort(-1).to(adv.device)
    return adv.gather(-1, order)


def _statistics(scores: torch.Tensor, adv: torch.Tensor, groups: Groups) -> torch.Tensor:
    """The :data:`STATS` of one micro-step over every group member, [5] float32."""
    finite = torch.isfinite(scores)
    valid = groups.mask.float()
    return torch.stack([
        scores.masked_fill(~finite, 0).sum() / finite.sum().clamp(min=1),
        1 - finite.float().mean(),
        adv.abs().mean(),
        (groups.token_entropy * valid).sum() / valid.sum().clamp(min=1),
        valid.sum(-1).mean(),
    ])


def _sample_records(tokenizer: Any, prompts: list[str], groups: Groups, scores: torch.Tensor, adv: torch.Tensor
                    ) -> list[dict[str, Any]]:
    """One record per prompt: its members' text, Eq. 1 scores (None: no answer, -inf), advantages, and whether
    the last two members are the human chosen and rejected responses (``anchored``)."""
    texts = tokenizer.batch_decode([row[keep].tolist() for row, keep in zip(groups.sequences.cpu(), groups.mask.cpu())],
                                   skip_special_tokens=True)
    finite = torch.isfinite(scores)
    score_list, finite_list, adv_list = torch.where(finite, scores, 0.0).tolist(), finite.tolist(), adv.tolist()
    records, start = [], 0
    for prompt, size, anchored in zip(prompts, groups.sizes.tolist(), groups.anchored):
        members = slice(start, start + size)
        records.append({"prompt": prompt, "candidates": texts[members],
                        "scores": [s if ok else None for s, ok in zip(score_list[members], finite_list[members])],
                        "advantages": adv_list[members], "anchored": anchored})
        start += size
    return records
