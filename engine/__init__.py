"""diffnas engine: a plain MLX diffusion library (no ray, no optuna)."""

from engine.device import blas as _blas

_blas.bind()
