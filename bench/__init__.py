"""Benchmarks of gem_fast: kernels (``python -m bench.kernels``) and sampling."""
