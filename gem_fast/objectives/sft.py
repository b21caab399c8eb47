"""SFT on completions: ``{prompt, completion}`` rows, chat ``{messages}`` rows, or the chosen responses of pairs."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gem_fast.config import TrainConfig
from gem_fast.data import Completion, PreferencePair, encode_prompt_responses, load_completions
from gem_fast.distributed import DistEnv, all_reduce_sum
from gem_fast.objectives.base import Objective
from gem_fast.policy import MicroBatch, PolicyLoss, StepBatches

__all__ = ["SFT"]


class SFT(Objective):
    """Mean negative log-likelihood of the completions' tokens over the global batch; its rows are
    :class:`~gem_fast.data.Completion` s (:func:`~gem_fast.data.load_completions`)."""

    pairs: list[Completion]

    def __init__(self, cfg: TrainConfig, env: DistEnv, pairs: Sequence[Completion | PreferencePair],
                 tokenizer: Any) -> None:
        # Preference pairs, the other objectives' rows, train on their chosen response.
        completions = [Completion(p.prompt, p.chosen) if isinstance(p, PreferencePair) else p for p in pairs]
        super().__init__(cfg, env, completions, tokenizer)

    @staticmethod
    def read_rows(path: str) -> list[Completion]:
        return load_completions(path)

    def step_batches(self, policy: PolicyLoss, step: int) -> StepBatches:
        """Weights ``1/N`` per response token, N counted over the global batch.

        FSDP averages gradients over ranks, so the weights carry a factor ``world`` to make that
        average the gradient of the global token mean.
        """
        run, env = self.cfg.run, self.env
        batches = []
        for micro in range(run.grad_accum):
            pairs = self.micro_pairs(step, micro)
            batches.append(encode_prompt_responses(
                self.tokenizer, [p.prompt for p in pairs], [p.completion for p in pairs],
                max_length=run.max_length, chat_template=run.chat_template, padding_side="right",
            ))
        local_tokens = sum(b.response_mask[:, 1:].sum() for b in batches).to(torch.float32).to(env.device)
        tokens = all_reduce_sum(local_tokens.clone(), env)
        scale = env.world / tokens.clamp(min=1)
        micro_batches = [MicroBatch(b.to(env.device), b.response_mask[:, 1:].to(env.device) * scale) for b in batches]
        return micro_batches, {"tokens_per_rank": local_tokens}
