"""diffnas engine: a plain MLX diffusion library (no ray, no optuna)."""

from engine.device import blas as _blas

_blas.bind()

# after the BLAS binding: on an MLX CUDA install this imports mlx
from engine.device import compile_mode as _compile_mode

_compile_mode.apply()
