"""The names flags choose from, importable without torch: the command-line parsers read them
before torch and transformers load (``--help`` and usage errors in well under a second)."""

from __future__ import annotations

__all__ = ["BACKENDS", "RATING_METHODS", "DTYPES"]

BACKENDS = ("auto", "naive", "torch", "triton")
"""Implementations of the fused vocab kernels (:func:`gem_fast.kernels.resolve_backend`)."""

RATING_METHODS = ("score", "bradley_terry", "trueskill")
"""What SEGA's reward mapping receives (:func:`gem_fast.ranking.candidate_ratings`)."""

DTYPES = ("float32", "bfloat16", "float16")
"""``--dtype`` of the evaluation scripts: names of torch dtypes (``getattr(torch, name)``)."""
