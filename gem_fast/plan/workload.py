"""What one rank of a training run does, as the memory planner (:mod:`gem_fast.plan.memory`) sees it:
:class:`Setup` (rows, lengths, loss path, device, attention, sharding) and its SEGA :class:`Sampling`
phase, given directly or read from a run's :class:`~gem_fast.config.TrainConfig`
(:func:`setup_from_train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gem_fast.config import TrainConfig

__all__ = ["Sampling", "Setup", "setup_from_train_config"]


@dataclass(frozen=True)
class Sampling:
    """SEGA's sampling phase per rank: ``prompts`` prompts of ``prompt_len`` tokens, k candidates of
    ``new_tokens`` each (``gem_fast.sampling.sample_group`` with ``shared_prefix``, top-p < 1)."""

    prompts: int
    k: int
    prompt_len: int
    new_tokens: int


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Setup:
    """One rank of a training run.

    ``micro_batch`` rows of ``seq_len`` tokens go through one forward+backward (for SEGA that is
    prompts × k candidate rows of prompt + generated tokens). ``response_len``: tokens per row
    the loss scores (the fused kernels drop prompt and padding rows before the logit GEMM; the
    naive path computes every position); None: all ``seq_len - 1``. ``device`` "cuda": bf16
    compute (FSDP2 mixed precision for ``world_size > 1``, autocast on one GPU); "cpu": fp32.
    ``attention`` None: FlashAttention on CUDA, SDPA on the CPU. ``liger_layers`` None: on for
    CUDA (the engine's ``liger_layers: auto`` with liger-kernel installed), off on the CPU.
    Batches are taken to be padded (SFT right padding, SEGA prompt and post-EOS padding), which
    decides how HF runs SDPA.
    """

    world_size: int = 1
    micro_batch: int = 1
    seq_len: int = 1024
    response_len: int | None = None
    loss: Literal["naive", "fused"] = "fused"
    activation_checkpointing: bool = False
    device: Literal["cuda", "cpu"] = "cuda"
    attention: Literal["flash", "sdpa"] | None = None
    liger_layers: bool | None = None
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        _check_count("world_size", self.world_size)
        _check_count("micro_batch", self.micro_batch)
        _check_count("seq_len", self.seq_len, minimum=2)  # at least one predicted token
        if self.response_len is not None:
            _check_count("response_len", self.response_len)
            if self.response_len > self.seq_len - 1:
                raise ValueError(f"response_len: {self.response_len} exceeds the seq_len - 1 = "
                                 f"{self.seq_len - 1} predicted positions")
        if self.loss not in ("naive", "fused"):
            raise ValueError(f"loss: expected 'naive' or 'fused', got {self.loss!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device: expected 'cuda' or 'cpu', got {self.device!r}")
        if self.attention not in (None, "flash", "sdpa"):
            raise ValueError(f"attention: expected 'flash', 'sdpa' or None, got {self.attention!r}")
        if self.attention == "flash" and self.device == "cpu":
            raise ValueError("attention: FlashAttention needs device='cuda'")
        if self.liger_layers and self.device == "cpu":
            raise ValueError("liger_layers: Liger's Triton layers need device='cuda'")
        if self.sampling is not None:
            for name in ("prompts", "k", "prompt_len", "new_tokens"):
                _check_count(f"sampling.{name}", getattr(self.sampling, name))

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def attention_kind(self) -> str:
        return self.attention or ("flash" if self.device == "cuda" else "sdpa")

    @property
    def liger(self) -> bool:
        return self.device == "cuda" if self.liger_layers is None else self.liger_layers

    @property
    def tokens(self) -> int:
        """Tokens through the decoder per micro-step."""
        return self.micro_batch * self.seq_len

    @property
    def positions(self) -> int:
        """Hidden states the loss receives: the last position of each row predicts nothing."""
        return self.micro_batch * (self.seq_len - 1)

    @property
    def scored(self) -> int:
        """Positions with a target (response tokens): the rows the fused kernels compute."""
        return self.micro_batch * (self.seq_len - 1 if self.response_len is None else self.response_len)


def setup_from_train_config(config: TrainConfig, *, world_size: int, loss: str, device: str,
                            attention: str | None = None, liger_layers: bool | None = None,
                            response_len: int | None = None) -> Setup:
    """Setup of one rank of the run that ``config`` describes (e.g. :func:`gem_fast.config.read_yaml`
    of a training YAML through :meth:`~gem_fast.config.TrainConfig.from_flat`).

    SEGA: ``batch_size`` prompts of up to ``max_length`` tokens, k candidates of
    ``gen_max_new_tokens`` each, trained as ``batch_size × k`` rows of prompt + generation whose
    generated tokens are scored. DPO/IPO: chosen and rejected rows of ``max_length``. SFT:
    ``batch_size`` rows of ``max_length``, ``response_len`` scored tokens per row (None: every
    position, an upper bound for the fused loss, which skips prompt tokens). With
    ``prefix_sharing`` not "off" (:mod:`gem_fast.prefix_sharing`) SEGA and DPO/IPO train on one
    packed row per prompt instead: P + k·R tokens (SEGA), ``max_length + response_len`` (a pair;
    ``response_len`` None: ``2·max_length - 1``, the bound for a one-token prompt), the responses
    scored; its attention is modelled as the layout without it (FlexAttention keeps what
    FlashAttention does, SDPA's mask is ``[rows, 1, L, L]`` either way).
    """
    run = config.run
    common = dict(world_size=world_size, loss=loss, device=device, attention=attention, liger_layers=liger_layers,
                  activation_checkpointing=config.parallel.activation_checkpointing)
    shared = run.prefix_sharing != "off"
    if run.objective == "sega":
        sampling = Sampling(run.batch_size, config.sampling.k, run.max_length, config.sampling.gen_max_new_tokens)
        if shared:
            scored = sampling.k * sampling.new_tokens
            return Setup(micro_batch=sampling.prompts, seq_len=sampling.prompt_len + scored, response_len=scored,
                         sampling=sampling, **common)
        return Setup(micro_batch=sampling.prompts * sampling.k, seq_len=sampling.prompt_len + sampling.new_tokens,
                     response_len=sampling.new_tokens, sampling=sampling, **common)
    if run.objective in ("dpo", "ipo") and shared:
        if response_len is None:
            return Setup(micro_batch=run.batch_size, seq_len=2 * run.max_length - 1, **common)
        return Setup(micro_batch=run.batch_size, seq_len=run.max_length + response_len,
                     response_len=2 * response_len, **common)
    rows = run.batch_size * (2 if run.objective in ("dpo", "ipo") else 1)
    return Setup(micro_batch=rows, seq_len=run.max_length, response_len=response_len, **common)
