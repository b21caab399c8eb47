"""Training configuration: typed sections, and the YAML config files that fill them (:func:`read_yaml`,
errors with file:line).

A run is a :class:`TrainConfig` of sections (``run``, ``optim``, ``parallel``, ``sampling``,
``sega``, ``pair``); functions take the sections they need. Field names are unique across
sections, so a config file may be flat (``lr: 1e-5`` sets ``optim.lr``) or nested by section
(``optim: {lr: 1e-5}``). The command line that fills the same fields (every field a ``--flag``,
the transformers/TRL names of :data:`HF_ALIASES` as aliases) is :func:`gem_fast.flags.parse_config`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Light modules only: the scripts parse their arguments before torch and transformers load.
from gem_fast.choices import BACKENDS, RATING_METHODS
from gem_fast.errors import UsageError, input_file, parse_bool
from gem_fast.reporting import REPORT_TO

__all__ = ["RunConfig", "OptimConfig", "GuardConfig", "ParallelConfig", "SamplingConfig", "SegaConfig", "PairConfig",
           "TrainConfig", "HF_ALIASES", "SEGA_ALIASES", "SEGA_SECTIONS", "PAIR_SECTIONS", "Section", "config_sections",
           "field_names", "parse_bool", "ConfigFile", "read_yaml"]


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    """A config field: its default, its help text and optional bounds ``at_least``, ``above``, ``at_most``
    (checked when a section is made, so a bad value stops before anything loads)."""
    return field(default=default, metadata={"help": help, **metadata})


_BOUNDS = {"at_least": (">=", lambda v, b: v >= b), "above": (">", lambda v, b: v > b),
           "at_most": ("<=", lambda v, b: v <= b)}


class _Bounded:
    """Mixin of the sections: :class:`UsageError` naming the flag for a value outside its field's bounds."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            for key, (sign, ok) in _BOUNDS.items():
                if key in f.metadata and isinstance(value, (int, float)) and not ok(value, f.metadata[key]):
                    raise UsageError(f"--{f.name} {value}: must be {sign} {f.metadata[key]} ({f.metadata['help']})")


@dataclass(frozen=True)
class RunConfig(_Bounded):
    """Data, model, objective, batch shape and the run's bookkeeping."""

    train_jsonl: str = _opt("", "training data, JSON Lines: preference pairs {prompt, chosen, rejected}; SFT also "
                                "takes {prompt, completion} and chat {messages} rows (see README, Data)")
    out_dir: str = _opt("outputs/run", "folder of the run: checkpoints/, metrics.jsonl, train_config.json and "
                                       "final/ (the trained model as a Hugging Face folder)")
    model_name_or_path: str | None = _opt(None, "HF model folder, a training run's out_dir (its final/), .gguf "
                                                "file or Hub id (unset: the embedded SmolLM2-135M-Instruct)")
    objective: Literal["sft", "sega", "dpo", "ipo"] = _opt("sft", "training objective: sft on the chosen responses, "
                                                                  "dpo or ipo on the pairs")
    prefix_sharing: Literal["auto", "on", "off"] = _opt(
        "auto", "SEGA, DPO, IPO: compute each prompt once per group, its responses packed after it "
                "(gem_fast.prefix_sharing); auto: on where the model's attention takes the packed layout")
    epochs: int = _opt(1, "passes over the data", at_least=1)
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: no cap, epochs decide)", at_least=0)
    batch_size: int = _opt(1, "rows (SFT), pairs (DPO/IPO) or prompts (SEGA) per rank per micro-step", at_least=1)
    grad_accum: int = _opt(1, "micro-steps per optimizer step; global batch = batch_size x grad_accum x ranks",
                           at_least=1)
    max_length: int = _opt(512, "tokens per prompt+response row, prompt cut from the left (SEGA: per prompt)",
                           at_least=2)
    seed: int = _opt(0, "seed of the data order and of SEGA's sampling")
    save_every: int = _opt(0, "optimizer steps between checkpoints (0: only when SIGTERM/SIGINT stops the run)",
                           at_least=0)
    keep_checkpoints: int = _opt(2, "newest checkpoints kept on disk; older ones are deleted", at_least=1)
    resume: bool = _opt(False, "continue from the newest checkpoint under out_dir/checkpoints (an empty out_dir "
                               "starts at step 0; a finished run, final/ written, is refused: --overwrite redoes it)")
    overwrite: bool = _opt(False, "start afresh in an out_dir that holds a run (its checkpoints, metrics and final/ "
                                  "are deleted first); without it such an out_dir is refused")
    allow_config_change: bool = _opt(False, "with --resume: apply training settings (lr, schedule, batch, "
                                            "objective, seed, data, model) that differ from the checkpoint's, "
                                            "logged, instead of refusing")
    chat_template: bool = _opt(False, "wrap prompts in the tokenizer's chat template (instruct models; the demo "
                                      "configs set true); eval_pref_accuracy.py of the run's final/ follows it")
    trust_remote_code: bool = _opt(False, "let transformers run Python code from the model repository (only for "
                                          "repositories you trust)")
    export_hf: bool = _opt(True, "write the trained model as a Hugging Face folder to <out_dir>/final at the end")
    export_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _opt(
        "auto", "dtype of the exported weights; auto: the one the model trained in (bf16 on CUDA, fp32 on the CPU)")
    progress: bool = _opt(True, "rank 0 shows progress bars and prints one line per step")
    report_to: str = _opt("none", "also send each step's metrics.jsonl record to TensorBoard (out_dir/tensorboard, "
                                  "needs the tensorboard package) or Weights & Biases (needs wandb; project from "
                                  "WANDB_PROJECT, default gem_fast)", choices=REPORT_TO)


@dataclass(frozen=True)
class OptimConfig(_Bounded):
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = _opt(1e-5, "peak learning rate of AdamW, reached after warmup_steps", above=0)
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay (per step, times the lr)", at_least=0)
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping, norm still logged)",
                                at_least=0)
    warmup_steps: int = _opt(0, "optimizer steps of linear warmup from lr/warmup_steps to lr", at_least=0)
    lr_decay: Literal["cosine", "linear", "constant"] = _opt(
        "cosine", "learning-rate schedule after warmup: cosine or linear down to min_lr_ratio x lr at the last "
                  "step, or constant")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr (cosine, linear)", at_least=0, at_most=1)


@dataclass(frozen=True)
class GuardConfig(_Bounded):
    """The divergence guard: a step that fails a check is not applied and the run stops (non-finite
    gradients always stop it)."""

    max_update_ratio: float = _opt(
        0.1, "stop before a step whose AdamW update norm exceeds this fraction of the weight norm (0: off)",
        at_least=0)
    max_grad_norm_spike: float = _opt(
        100.0, "stop before a step whose gradient norm exceeds this multiple of the median of the last "
               "100 steps' (needs 10 steps of history; 0: off)", at_least=0)


@dataclass(frozen=True)
class ParallelConfig(_Bounded):
    """How the step runs: kernel backend, Liger layers, torch.compile, activation checkpointing, model init."""

    kernel_backend: str = _opt("auto", "implementation of the fused vocab kernels (log-probs, entropy, loss) in "
                                       "training and in SEGA's sampler; auto: triton on CUDA, else torch",
                               choices=BACKENDS)
    liger_layers: Literal["auto", "on", "off"] = _opt(
        "auto", "Liger-Kernel RMSNorm/RoPE/SwiGLU in the decoder (never its cross-entropy); auto: on with CUDA "
                "and liger-kernel")
    compile_layers: bool = _opt(False, "torch.compile each decoder layer (after activation checkpointing, before FSDP)")
    activation_checkpointing: bool = _opt(False, "recompute each decoder layer's activations in backward: less "
                                                 "memory, one more forward per layer")
    init: Literal["auto", "meta", "full"] = _opt(
        "auto", "meta: build the model on the meta device, shard it, then each rank reads its own shards from the "
                "safetensors; full: every rank loads the whole model first (small models); auto: meta when sharded "
                "and the model is a local safetensors folder")


@dataclass(frozen=True)
class SamplingConfig(_Bounded):
    """SEGA's candidates: k per prompt, their length and the sampler."""

    k: int = _opt(4, "candidates sampled per prompt, the group of Eq. 2's advantages (2 or more: one candidate "
                     "trains nothing)", at_least=2)
    gen_max_new_tokens: int = _opt(256, "tokens generated per candidate at most (fewer when it ends with EOS)",
                                   at_least=1)
    temperature: float = _opt(1.0, "sampling temperature T (0: greedy); Eq. 1's entropies are of softmax(logits / T) "
                                   "(greedy: of softmax(logits))", at_least=0)
    top_p: float = _opt(0.95, "nucleus sampling: draw from the most probable tokens holding this probability "
                              "mass (1: all)", above=0, at_most=1)


@dataclass(frozen=True)
class SegaConfig(_Bounded):
    """GEM Eq. 1 (scores) and Eq. 2 (group advantages)."""

    lambda_fork: float = _opt(0.4, "Eq. 1, S = -mean(H_answer) + lambda_fork x mean(H_forks): weight of the "
                                   "fork tokens' entropy")
    top_m: float = _opt(0.1, "Eq. 1: fraction (0-1] of a candidate's tokens before the answer span, those of "
                             "highest entropy, taken as forks", above=0, at_most=1)
    final_weight: float = _opt(1.0, "Eq. 1, S = -final_weight x mean(H_answer) + ...: weight of the terminal "
                                    "(answer) entropy term; 0 is the paper's ablation without it", at_least=0)
    reward_mapping: Literal["identity", "softmax", "zscore"] = _opt(
        "softmax", "scores to rewards: identity, softmax over the group at reward_temperature, or zscore "
                   "(S - mean) / std over the group (the official GEM code's)")
    reward_temperature: float = _opt(1.0, "softmax temperature T of the reward mapping, r = softmax(S / T) "
                                          "(train_sega.py's --beta)", above=0)
    final_span: Literal["last_fraction", "marker"] = _opt(
        "last_fraction", "which tokens Eq. 1 scores as the answer: the last final_fraction of the candidate, or "
                         "the tokens after an 'Answer:' / '####' marker (see marker_fallback)")
    final_fraction: float = _opt(0.25, "this fraction (0-1] of a candidate's tokens, from its end, is the answer "
                                       "(final_span last_fraction, or a marker's fallback)", above=0, at_most=1)
    marker_fallback: bool = _opt(True, "final_span marker: a candidate without a marker (cut off by "
                                       "gen_max_new_tokens) is scored on its last final_fraction instead of getting "
                                       "-inf and reward 0")
    shuffle_advantages: bool = _opt(False, "control run: permute each group's advantages at random every step, so "
                                           "that only the sampling, not the entropy ranking, can teach")
    ranking: str = _opt("score", "what the reward mapping receives: the Eq. 1 scores, or Bradley-Terry / TrueSkill "
                                 "ratings fitted to the candidates' token-level entropy comparisons",
                        choices=RATING_METHODS)
    log_samples_every: int = _opt(10, "every this many optimizer steps rank 0 appends its prompts, candidates, "
                                      "Eq. 1 scores and advantages to out_dir/samples.jsonl (0: never)", at_least=0)
    anchor_weight: float = _opt(0.0, "human-anchored groups: a preference row's group is its k candidates plus the "
                                     "human chosen and rejected responses, and the ranking counts the human "
                                     "preference as this many extra wins of chosen over rejected (needs ranking "
                                     "bradley_terry or trueskill; 0: off, the human responses go unused)",
                                at_least=0)
    trim: int = _opt(0, "the N lowest-ranked members of each group get advantage 0 and the mapping and mean run over "
                        "the rest (the GEM README's trimming of low-scoring outliers); at most k-1", at_least=0)
    filtered_dpo: bool = _opt(False, "Cognitive Filtering + DPO (the paper's ablation row) instead of Eq. 2: before "
                                     "training the initial model samples and ranks each prompt's group once, and DPO "
                                     "trains on its top- and bottom-ranked member (after trim) as (chosen, rejected)")
    dpo_beta: float = _opt(0.1, "filtered_dpo: β of DPO's implicit reward β·log(π/π_ref)", above=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor_weight > 0 and self.ranking == "score":
            raise UsageError(f"--anchor_weight {self.anchor_weight} needs --ranking bradley_terry or trueskill: the "
                             "human win is a comparison, and Eq. 1 scores alone take none")
        if self.final_weight == 0 and self.lambda_fork == 0:
            raise UsageError("--final_weight 0 with --lambda_fork 0 leaves Eq. 1 no term to rank by")


@dataclass(frozen=True)
class PairConfig(_Bounded):
    """DPO / IPO on human pairs."""

    beta: float = _opt(1.0, "β of the implicit reward β·log(π/π_ref): larger keeps the policy nearer the reference",
                       above=0)
    length_normalize: bool = _opt(False, "compare per-token mean log-probs instead of sums (TRL does so for IPO)")


# Sections only one family of objectives reads; the other's flags are not offered.
SEGA_SECTIONS = ("sampling", "sega")
PAIR_SECTIONS = ("pair",)
# Run fields a resumed run must keep (unless --allow_config_change); the others are bookkeeping.
_TRAINING_RUN_FIELDS = ("model_name_or_path", "objective", "epochs", "max_steps", "batch_size", "grad_accum",
                        "max_length", "seed", "chat_template")
# Flat names kept for what users type today: SEGA's `beta` is its reward temperature.
SEGA_ALIASES = {"beta": "reward_temperature"}
# transformers' TrainingArguments / TRL names of the same settings, as flags and YAML keys.
HF_ALIASES = {"learning_rate": "lr", "output_dir": "out_dir", "per_device_train_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs"}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run, by section."""

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sega: SegaConfig = field(default_factory=SegaConfig)
    pair: PairConfig = field(default_factory=PairConfig)

    def __post_init__(self) -> None:
        # Filtered DPO needs two members left after trimming; Eq. 2 one (the smallest group has k).
        most = self.sampling.k - (2 if self.sega.filtered_dpo else 1)
        if self.run.objective == "sega" and self.sega.trim > most:
            raise UsageError(f"--trim {self.sega.trim}: at most k - {self.sampling.k - most} = {most} with --k "
                             f"{self.sampling.k}{' and --filtered_dpo' if self.sega.filtered_dpo else ''}")

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """Config from flat field names (the :data:`HF_ALIASES` and SEGA's ``beta`` alias included); an
        ``objective`` left out is "sega" when a sampling/SEGA field is named (a SEGA YAML), else "sft".
        Unknown names: KeyError; an alias beside its field: ValueError."""
        values = field_names(values, HF_ALIASES)
        where = _field_sections()
        if "objective" not in values:
            values["objective"] = "sega" if any(where.get(n) in SEGA_SECTIONS for n in values) else "sft"
        if values["objective"] == "sega":
            # Beside reward_temperature, `beta` is the pair section's own field (what to_flat writes).
            values = field_names(values, {a: n for a, n in SEGA_ALIASES.items() if n not in values})
        if unknown := sorted(set(values) - set(where)):
            raise KeyError(f"unknown config keys {unknown}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            by_section.setdefault(where[name], {})[name] = value
        return cls(**{s.name: s.type_(**by_section.get(s.name, {})) for s in config_sections()})

    def to_flat(self) -> dict[str, Any]:
        """Every field by its flat name (what ``train_config.json`` holds)."""
        return {k: v for section in dataclasses.asdict(self).values() for k, v in section.items()}

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with the given flat fields changed."""
        return TrainConfig.from_flat({**self.to_flat(), **flat})

    def training_settings(self) -> dict[str, Any]:
        """The fields by flat name whose change alters what a resumed run computes: the run fields in
        ``_TRAINING_RUN_FIELDS`` and every field of the optimizer and the objective's sections."""
        own = {"sega": SEGA_SECTIONS, "dpo": PAIR_SECTIONS, "ipo": PAIR_SECTIONS}.get(self.run.objective, ())
        sections = ("optim", *own)
        flat = {k: v for name in sections for k, v in dataclasses.asdict(getattr(self, name)).items()}
        return {**{k: getattr(self.run, k) for k in _TRAINING_RUN_FIELDS}, **flat}


@dataclass(frozen=True)
class Section:
    """One section of :class:`TrainConfig`: its field name and dataclass."""

    name: str
    type_: type


def config_sections() -> list[Section]:
    """The sections of :class:`TrainConfig` in order, each with its dataclass."""
    hints = typing.get_type_hints(TrainConfig)
    return [Section(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _field_sections() -> dict[str, str]:
    return {f.name: s.name for s in config_sections() for f in dataclasses.fields(s.type_)}


def field_names(values: dict[str, Any], aliases: dict[str, str], *, spell: str = "keys {} and {}") -> dict[str, Any]:
    """``values`` with each alias key renamed to its field; ``ValueError`` naming both when an alias and
    its field are given (``spell`` formats the two names, e.g. ``"--{} and --{}"``)."""
    renamed = dict(values)
    for alias, name in aliases.items():
        if alias not in renamed:
            continue
        if name in renamed:
            raise ValueError(f"{spell.format(alias, name)} set the same field; give one of them")
        renamed[name] = renamed.pop(alias)
    return renamed


class ConfigFile(dict):
    """A config file's fields by flat name (a dict), and where each was written: :meth:`where`."""

    def __init__(self, path: Path, values: dict[str, Any], lines: dict[str, int]) -> None:
        super().__init__(values)
        self.path, self.lines = path, lines

    def where(self, key: str) -> str:
        """``file:line`` of ``key`` (the file alone for a key it does not hold)."""
        return f"{self.path}:{self.lines[key]}" if key in self.lines else str(self.path)


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    """1-based line of every key of a YAML mapping and of the mappings nested in it."""
    lines: dict[str, int] = {}
    for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
        lines[str(key.value)] = key.start_mark.line + 1
        lines.update(_key_lines(value))
    return lines


def read_yaml(path: str | Path, sections: tuple[str, ...] | None = None) -> ConfigFile:
    """A config file's fields by flat name: top-level keys, or a section's mapping (``optim: {lr: ...}``).

    A nested section must be one of ``sections`` (None: any) and hold only its own fields
    (there, ``beta`` is never SEGA's alias); :class:`UsageError` (a ``ValueError``) naming the file
    (and the line of a YAML syntax error) otherwise, or when the file is missing or not UTF-8.
    """
    path = input_file(path, "--config")
    try:
        text = path.read_text(encoding="utf-8")
        loaded = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}: invalid YAML ({what})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of config keys, got a YAML {type(loaded).__name__}")
    by_name = {s.name: s.type_ for s in config_sections() if sections is None or s.name in sections}
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if not isinstance(value, dict):
            flat[key] = value
            continue
        if key not in by_name:
            raise UsageError(f"{path}:{lines.get(str(key), '?')}: {key!r} is not a config section here "
                             f"(sections: {sorted(by_name)})")
        if unknown := sorted(set(value) - {f.name for f in dataclasses.fields(by_name[key])}):
            raise UsageError(f"{path}: unknown keys {unknown} in section {key!r}")
        flat.update(value)
    return ConfigFile(path, flat, lines)
