"""The device: BLAS binding, kernel cache, latency and memory measurement, the memory model.

Importing this package (``import engine`` does, before anything loads mlx) points MLX's
CUDA kernel cache at a persistent folder (:mod:`engine.device.kernel_cache`); on a
CPU-only or Metal install it does nothing.
"""

from engine.device import kernel_cache as _kernel_cache

_kernel_cache.configure()
