"""Bind MLX's CPU backend to an optimised BLAS before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links netlib's reference BLAS (about 6 GFLOP/s on a
2-core x86 machine). Opening the system OpenBLAS with ``RTLD_GLOBAL`` before MLX's
shared library is loaded makes the dynamic linker resolve MLX's ``cblas_*``/``sgemm``
symbols to OpenBLAS instead (about 190-300 GFLOP/s on the same machine), with no
``LD_PRELOAD`` and no re-exec. This module must be imported before ``mlx``.

Set ``DIFFNAS_BLAS=reference`` to keep the wheel's own BLAS (for side-by-side
benchmarks), or ``DIFFNAS_BLAS=/path/to/libopenblas.so`` to choose a library.
``OPENBLAS_NUM_THREADS`` defaults to 1 so that several workers can share a machine.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

BLAS_NAME = "reference (netlib, bundled with mlx)"
"""Which BLAS MLX's CPU backend calls in this process; set by :func:`bind`."""


def _choose() -> str | None:
    wanted = os.environ.get("DIFFNAS_BLAS", "auto")
    if wanted == "reference":
        return None
    if wanted != "auto":
        return wanted
    return next((p for p in _CANDIDATES if os.path.exists(p)), None)


def _preloaded() -> str | None:
    """The OpenBLAS already mapped into this process (``LD_PRELOAD`` or an earlier bind)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libopenblas" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def bind() -> str:
    """Load an optimised BLAS globally if one exists; return the name of the BLAS in use."""
    global BLAS_NAME
    if sys.platform == "darwin":
        BLAS_NAME = "accelerate"
        return BLAS_NAME
    already = _preloaded()
    if already:
        BLAS_NAME = f"openblas ({already})"
        return BLAS_NAME
    path = _choose()
    if path is None:
        return BLAS_NAME
    if "mlx.core" in sys.modules:
        # Too late: MLX already resolved its BLAS symbols to the bundled library.
        return BLAS_NAME
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return BLAS_NAME
    BLAS_NAME = f"openblas ({path})"
    return BLAS_NAME
