"""gem_fast: fused vocab kernels and a training engine for GEM / group-based RLHF."""

__version__ = "0.1.0"
