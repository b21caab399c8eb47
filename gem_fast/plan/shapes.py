"""Model shapes: the sizes of a Llama-shaped decoder that memory plans and benchmarks depend on.

One place for :class:`ModelShape` and the :data:`PRESETS` the memory planner
(:mod:`gem_fast.plan.memory`) and the benchmarks (``bench/``) share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ModelShape", "PRESETS", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder: the sizes every memory term depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # input embedding and LM head share one [V, H] matrix

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o projections, gated MLP, two RMSNorm weights."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def root_params(self) -> int:
        """Parameters outside the decoder layers (FSDP2's root unit): embeddings, final norm, LM head."""
        matrices = 1 if self.tied else 2
        return matrices * self.vocab * self.hidden + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def largest_param(self) -> int:
        """Elements of the largest single parameter (the [V, H] embedding)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def kv_bytes_per_token(self, element: int) -> int:
        """K and V of one token over all layers, ``element`` bytes each."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element


PRESETS: dict[str, ModelShape] = {
    "llama3-8b": ModelShape("llama3-8b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                            intermediate=14336, vocab=128256, tied=False),
    "llama-1b": ModelShape("llama-1b", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
                           intermediate=8192, vocab=128256, tied=True),
    "smollm2-135m": ModelShape("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                               intermediate=1536, vocab=49152, tied=True),
}


def _config_value(config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def model_shape(model: str | Path | Mapping[str, Any] | Any) -> ModelShape:
    """Shape from a preset name (:data:`PRESETS`), an HF ``config.json`` (file or its folder),
    a dict of its fields, or a ``transformers.PretrainedConfig``.

    Missing ``num_key_value_heads`` means multi-head attention, missing ``head_dim`` is
    hidden / heads and missing ``tie_word_embeddings`` is False (Llama's default).
    """
    if isinstance(model, (str, Path)):
        if str(model) in PRESETS:
            return PRESETS[str(model)]
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {model!r} is neither a preset {sorted(PRESETS)} nor a config.json file or folder")
        config: Any = json.loads(path.read_text())
        name = path.parent.name or path.stem
    else:
        config, name = model, str(_config_value(model, "name_or_path", "") or _config_value(model, "model_type", "model"))
    fields = {key: _config_value(config, key) for key in
              ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")}
    if missing := [key for key, value in fields.items() if not value]:
        raise ValueError(f"model: config has no {missing}; expected a Llama-shaped decoder config")
    heads = int(fields["num_attention_heads"])
    return ModelShape(
        name=name,
        hidden=int(fields["hidden_size"]),
        layers=int(fields["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(_config_value(config, "num_key_value_heads") or heads),
        head_dim=int(_config_value(config, "head_dim") or fields["hidden_size"] // heads),
        intermediate=int(fields["intermediate_size"]),
        vocab=int(fields["vocab_size"]),
        tied=bool(_config_value(config, "tie_word_embeddings", False)),
    )
