"""Training configuration: typed sections and the one YAML + command-line parser that fills them.

A run is a :class:`TrainConfig` of sections (``run``, ``optim``, ``parallel``, ``sampling``,
``sega``, ``pair``); functions take the sections they need. What users type is flat: every field
is a ``--flag`` and a top-level YAML key of the same name (field names are unique across
sections), e.g. ``--lr`` sets ``optim.lr``; nested YAML (``optim: {lr: 1e-5}``) is read as well.
``--beta`` of ``train_sega.py`` is the SEGA reward temperature (the GEM README's flag); of
``train_sft.py`` (DPO/IPO) it is the β of the implicit reward. Flag help comes from the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gem_fast.kernels import BACKENDS
from gem_fast.ranking import RATING_METHODS

__all__ = ["RunConfig", "OptimConfig", "ParallelConfig", "SamplingConfig", "SegaConfig", "PairConfig",
           "TrainConfig", "parse_bool", "read_yaml", "parse_config"]


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class RunConfig:
    """Data, model, objective, batch shape and the run's bookkeeping."""

    train_jsonl: str = _opt("", "preference pairs JSONL (prompt, chosen, rejected)")
    out_dir: str = _opt("outputs/run", "checkpoints, metrics.jsonl, train_config.json and the HF export")
    model_name_or_path: str | None = _opt(None, "HF model folder or hub id (unset: the embedded SmolLM2 GGUF)")
    objective: Literal["sft", "sega", "dpo", "ipo"] = _opt("sft", "training objective")
    prefix_sharing: Literal["auto", "on", "off"] = _opt(
        "auto", "SEGA, DPO, IPO: compute each prompt once per group, its responses packed after it "
                "(gem_fast.prefix_sharing); auto: on where the model's attention takes the packed layout")
    epochs: int = _opt(1, "passes over the data")
    max_steps: int = _opt(0, "> 0 caps the optimizer steps")
    batch_size: int = _opt(1, "rows (SFT, DPO/IPO pairs) or prompts (SEGA) per rank per micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    max_length: int = _opt(512, "tokens per row (SEGA: per prompt)")
    seed: int = _opt(0, "data order and sampling seed")
    save_every: int = _opt(0, "optimizer steps between checkpoints; 0: only on SIGTERM/SIGINT")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk")
    resume: bool = _opt(False, "continue from the newest checkpoint under out_dir")
    chat_template: bool = _opt(False, "wrap prompts in the tokenizer's chat template")
    trust_remote_code: bool = _opt(False, "let transformers run the model repository's code")
    export_hf: bool = _opt(True, "write the trained model as an HF folder into out_dir at the end")
    progress: bool = _opt(True, "progress bar and per-step lines on rank 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = _opt(1e-5, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping, norm still logged)")
    warmup_steps: int = _opt(0, "linear warmup steps")
    lr_decay: Literal["cosine", "linear", "constant"] = _opt("cosine", "decay after warmup")
    min_lr_ratio: float = _opt(0.1, "final learning rate / peak")


@dataclass(frozen=True)
class ParallelConfig:
    """How the step runs: kernel backend, Liger layers, torch.compile, activation checkpointing."""

    kernel_backend: str = _opt("auto", "backend of gem_fast.kernels", choices=BACKENDS)
    liger_layers: Literal["auto", "on", "off"] = _opt(
        "auto", "Liger-Kernel RMSNorm/RoPE/SwiGLU in the decoder (never its cross-entropy); auto: on with CUDA "
                "and liger-kernel")
    compile_layers: bool = _opt(False, "torch.compile each decoder layer (after activation checkpointing, before FSDP)")
    activation_checkpointing: bool = _opt(False, "recompute each decoder layer's activations in backward")


@dataclass(frozen=True)
class SamplingConfig:
    """SEGA's candidates: k per prompt, their length and the sampler."""

    k: int = _opt(4, "SEGA candidates sampled per prompt")
    gen_max_new_tokens: int = _opt(256, "tokens generated per candidate at most")
    temperature: float = _opt(1.0, "sampling temperature")
    top_p: float = _opt(0.95, "nucleus sampling mass")


@dataclass(frozen=True)
class SegaConfig:
    """GEM Eq. 1 (scores) and Eq. 2 (group advantages)."""

    lambda_fork: float = _opt(0.4, "Eq. 1: weight of the fork-token entropy term")
    top_m: float = _opt(0.1, "Eq. 1: fraction of highest-entropy tokens taken as forks")
    reward_mapping: Literal["identity", "softmax"] = _opt("softmax", "scores to rewards")
    reward_temperature: float = _opt(1.0, "softmax temperature of the reward mapping, r = softmax(S / T) "
                                          "(flag alias --beta)")
    final_span: Literal["last_fraction", "marker"] = _opt("last_fraction", "which tokens Eq. 1 scores as the answer")
    final_fraction: float = _opt(0.25, "last_fraction: that fraction of a candidate's last tokens")
    ranking: str = _opt("score", "what the reward mapping receives: the Eq. 1 scores, or Bradley-Terry / TrueSkill "
                                 "ratings fitted to the candidates' token-level entropy comparisons",
                        choices=RATING_METHODS)


@dataclass(frozen=True)
class PairConfig:
    """DPO / IPO on human pairs."""

    beta: float = _opt(1.0, "β of the implicit reward β·log(π/π_ref)")
    length_normalize: bool = _opt(False, "per-token mean log-probs instead of sums")


# Sections only one family of objectives reads; the other's flags are not offered.
_SEGA_SECTIONS = ("sampling", "sega")
_PAIR_SECTIONS = ("pair",)
# Flat names kept for what users type today: SEGA's `beta` is its reward temperature.
_SEGA_ALIASES = {"beta": "reward_temperature"}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run, by section."""

    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sega: SegaConfig = field(default_factory=SegaConfig)
    pair: PairConfig = field(default_factory=PairConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """Config from flat field names (SEGA's ``beta`` alias included); an ``objective`` left out is
        "sega" when a sampling/SEGA field is named (a SEGA YAML), else "sft". Unknown names: KeyError."""
        values = dict(values)
        where = _field_sections()
        if "objective" not in values:
            values["objective"] = "sega" if any(where.get(n) in _SEGA_SECTIONS for n in values) else "sft"
        if values["objective"] == "sega":
            values = {_SEGA_ALIASES.get(n, n): v for n, v in values.items()}
        if unknown := sorted(set(values) - set(where)):
            raise KeyError(f"unknown config keys {unknown}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            by_section.setdefault(where[name], {})[name] = value
        return cls(**{s.name: s.type_(**by_section.get(s.name, {})) for s in _sections()})

    def to_flat(self) -> dict[str, Any]:
        """Every field by its flat name (what ``train_config.json`` holds)."""
        return {k: v for section in dataclasses.asdict(self).values() for k, v in section.items()}

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with the given flat fields changed."""
        return TrainConfig.from_flat({**self.to_flat(), **flat})


@dataclass(frozen=True)
class _Section:
    name: str
    type_: type


def _sections() -> list[_Section]:
    hints = typing.get_type_hints(TrainConfig)
    return [_Section(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _field_sections() -> dict[str, str]:
    return {f.name: s.name for s in _sections() for f in dataclasses.fields(s.type_)}


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) as a bool; argparse's error otherwise."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _arg_spec(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords for a field (also used to coerce YAML strings such as 1e-5)."""
    spec: dict[str, Any] = {"help": f.metadata["help"] + f" (default: {f.default})"}
    if "choices" in f.metadata:
        return {**spec, "choices": f.metadata["choices"]}
    if typing.get_origin(hint) is Literal:
        return {**spec, "choices": typing.get_args(hint)}
    if hint is bool:
        return {**spec, "type": parse_bool, "nargs": "?", "const": True}
    if hint in (int, float):
        return {**spec, "type": hint}
    return {**spec, "type": str}  # str and str | None


def read_yaml(path: str | Path, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A config file's fields by flat name: top-level keys, or a section's mapping (``optim: {lr: ...}``).

    A nested section must be one of ``sections`` (None: any) and hold only its own fields
    (there, ``beta`` is never SEGA's alias); ``ValueError`` naming the file otherwise.
    """
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    by_name = {s.name: s.type_ for s in _sections() if sections is None or s.name in sections}
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if not isinstance(value, dict):
            flat[key] = value
            continue
        if key not in by_name:
            raise ValueError(f"{path}: {key!r} is not a config section here (sections: {sorted(by_name)})")
        if unknown := sorted(set(value) - {f.name for f in dataclasses.fields(by_name[key])}):
            raise ValueError(f"{path}: unknown keys {unknown} in section {key!r}")
        flat.update(value)
    return flat


def parse_config(argv: list[str] | None, *, objective: str, description: str) -> TrainConfig:
    """TrainConfig from ``--config file.yaml`` and then CLI flags (a flag given wins over YAML).

    Every field is a ``--flag`` (``--resume`` alone means true). ``objective`` "sega" fixes the
    objective and offers the sampling/SEGA sections; otherwise it is the default of
    ``--objective`` (sft, dpo, ipo) and the pair section is offered. Unknown YAML keys stop with
    the file name.
    """
    sega = objective == "sega"
    hidden = _PAIR_SECTIONS if sega else _SEGA_SECTIONS
    specs: dict[str, dict[str, Any]] = {}
    for section in _sections():
        if section.name in hidden:
            continue
        hints = typing.get_type_hints(section.type_)
        for f in dataclasses.fields(section.type_):
            specs[f.name] = _arg_spec(f, hints[f.name])
    if sega:
        del specs["objective"]
        for alias, name in _SEGA_ALIASES.items():
            specs[alias] = specs[name]
    else:
        specs["objective"]["choices"] = ("sft", "dpo", "ipo")
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config fields (flat, or nested by section)")
    for name, spec in specs.items():
        parser.add_argument(f"--{name}", **spec)
    cli = vars(parser.parse_args(argv))
    values: dict[str, Any] = {"objective": objective}
    if "config" in cli:
        path = cli.pop("config")
        try:
            loaded = read_yaml(path, tuple(s.name for s in _sections() if s.name not in hidden))
        except ValueError as exc:
            parser.error(str(exc))
        if unknown := sorted(set(loaded) - set(specs)):
            parser.error(f"{path}: unknown keys {unknown} for {objective}")
        for name, value in loaded.items():
            spec = specs[name]
            if isinstance(value, str) and spec.get("type") in (int, float, parse_bool):
                value = spec["type"](value)
            if isinstance(value, bool) and "on" in spec.get("choices", ()):  # YAML 1.1 reads a bare on/off as a bool
                value = "on" if value else "off"
            if "choices" in spec and value not in spec["choices"]:
                parser.error(f"{path}: {name} must be one of {spec['choices']}, got {value!r}")
            values[name] = value
    values.update(cli)
    return TrainConfig.from_flat(values)
