"""Whether the engine compiles whole graphs: yes on the CPU and on Metal, no on MLX CUDA.

``mx.compile`` fuses element-wise chains into generated kernels. On the CPU that is what
makes the engine's layers fast (``benchmarks/cpu_speed.md``) and costs milliseconds. On
MLX's CUDA backend every fused graph is a new kernel that NVRTC builds when it is first
called, in every fresh process (each trial is one, ``workers.process``); the on-disk kernel
cache (:mod:`engine.device.kernel_cache`) shortens that, but does not remove it.

Measured on one H200, the demo U-Net, train step at batch 32 then one DDIM-20 run at
batch 1, each in a fresh process (``benchmarks/gpu/startup.sh``, 2026-12-03):

=====================  ============  ===========  ============  =============
                       first step    steady step  first DDIM    modules built
=====================  ============  ===========  ============  =============
eager, empty cache     6.3 s         51 ms        0.46 s        2
eager, warm cache      0.81 s        53 ms        0.46 s        0
compiled, empty cache  > 200 s       (cut off)    (cut off)     65 +
compiled, warm cache   17.0 s        20 ms        30.1 s        13 more
=====================  ============  ===========  ============  =============

A compiled demo trial (600 steps) saves 600 x 31 ms = 19 s of training and pays 47 s with
a warm cache, minutes with a cold one. So on a CUDA GPU the engine's whole-graph compiles
(the training step, the sampler's forward, the feature network's step: :func:`whole`) run
their functions as they are. Small shapeless compiled functions, one kernel per dtype and
rank (:mod:`engine.training.fused`: the optimizer and EMA updates), stay compiled.
``DIFFNAS_COMPILE=on`` or ``=off`` forces either way on any device (``auto``, the default,
decides as above).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from engine.device import kernel_cache

ENV = "DIFFNAS_COMPILE"
CHOICES = ("auto", "on", "off")

STATUS: dict[str, Any] = {"compile": "on", "compile_source": "not applied"}
"""What :func:`apply` decided in this process, for the device report."""


def decide(mode: str, cuda_gpu: bool) -> tuple[bool, str]:
    """Whether to compile, and why, for ``DIFFNAS_COMPILE=mode`` on this device."""
    if mode not in CHOICES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(CHOICES)}")
    if mode != "auto":
        return mode == "on", f"{ENV}={mode}"
    if cuda_gpu:
        return False, "auto: MLX CUDA GPU (NVRTC builds each fused graph in every process)"
    return True, "auto: CPU or Metal"


def whole_graph() -> bool:
    """Whether this process compiles whole graphs (:func:`apply` decided)."""
    return bool(STATUS["compile"] == "on")


def whole(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``mx.compile(fn, **kwargs)`` where whole graphs are compiled, else ``fn`` itself."""
    if not whole_graph():
        return fn
    import mlx.core as mx

    return mx.compile(fn, **kwargs)


def apply(environ: dict[str, str] | os._Environ[str] | None = None) -> dict[str, Any]:
    """Decide whether this process compiles whole graphs; ``import engine`` calls it.

    A value of ``DIFFNAS_COMPILE`` outside :data:`CHOICES` is one line on stderr, and
    ``auto`` is used.

    mlx is imported only where a mode is forced or an MLX CUDA backend is installed, so a
    CPU or Metal install with the default loads nothing here.
    """
    env = os.environ if environ is None else environ
    mode = env.get(ENV, "auto").strip().lower() or "auto"
    if mode not in CHOICES:  # at import, where an exception would be a traceback
        print(f"diffnas: {ENV}={mode!r} is not one of {', '.join(CHOICES)}; using auto",
              file=sys.stderr)
        mode = "auto"
    cuda = kernel_cache.cuda_backend() is not None
    if mode == "auto" and not cuda:
        on, why = decide(mode, cuda_gpu=False)
    else:
        import mlx.core as mx

        on, why = decide(mode, cuda_gpu=cuda and mx.default_device() == mx.gpu)
    STATUS.update(compile="on" if on else "off", compile_source=why)
    return dict(STATUS)
