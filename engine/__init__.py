"""diffnas engine: a plain MLX diffusion library (no ray, no optuna)."""

from engine import _blas

_blas.bind()
