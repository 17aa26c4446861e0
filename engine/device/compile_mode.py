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
a warm cache, minutes with a cold one. So on a CUDA GPU the engine runs eagerly by default
(``off``: :func:`mlx.core.disable_compile`, every ``mx.compile`` calls its function as it
is; the mode measured above and in the demo search on the H200).

The modes, forced with ``DIFFNAS_COMPILE`` on any device (``auto``, the default, decides as
above):

- ``on``: the engine's whole-graph compiles (the training step, the sampler's forward, the
  feature network's step: :func:`whole`) are compiled;
- ``fused``: those run as they are, while each parameter array's AdamW and EMA update is
  one small shapeless compiled kernel (:mod:`engine.training.fused`). It is meant for the
  eager GPU step, whose per-array updates are thousands of kernel launches. On the H200 it
  took 12-14% off a steady demo step (61.8-66.0 against 70.3-76.5 ms) and 12.7 s more to
  start on an empty kernel cache; in the demo search its eight workers took 93 s to start
  (12 s eager) while the trials trained 5-11 s less (``benchmarks/gpu/README.md``), so
  ``auto`` does not choose it;
- ``off``: nothing is compiled.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from engine.device import kernel_cache

ENV = "DIFFNAS_COMPILE"
CHOICES = ("auto", "on", "fused", "off")

STATUS: dict[str, Any] = {"compile": "on", "compile_source": "not applied"}
"""What :func:`apply` decided in this process, for the device report."""


def decide(mode: str, cuda_gpu: bool) -> tuple[str, str]:
    """The mode (``on``, ``fused`` or ``off``) and why, for ``DIFFNAS_COMPILE=mode`` here."""
    if mode not in CHOICES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(CHOICES)}")
    if mode != "auto":
        return mode, f"{ENV}={mode}"
    if cuda_gpu:
        return "off", "auto: MLX CUDA GPU (NVRTC builds each fused graph in every process)"
    return "on", "auto: CPU or Metal"


def whole_graph() -> bool:
    """Whether this process compiles whole graphs (:func:`apply` decided)."""
    return bool(STATUS["compile"] == "on")


def fused_updates() -> bool:
    """Whether per-array optimizer and EMA updates are fused kernels (mode ``fused``)."""
    return bool(STATUS["compile"] == "fused")


def whole(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``mx.compile(fn, **kwargs)`` where whole graphs are compiled, else ``fn`` itself."""
    if not whole_graph():
        return fn
    import mlx.core as mx

    return mx.compile(fn, **kwargs)


def apply(environ: dict[str, str] | os._Environ[str] | None = None) -> dict[str, Any]:
    """Decide what this process compiles; ``import engine`` calls it.

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
        chosen, why = decide(mode, cuda_gpu=False)
    else:
        import mlx.core as mx

        chosen, why = decide(mode, cuda_gpu=cuda and mx.default_device() == mx.gpu)
        if chosen == "off":
            mx.disable_compile()
        else:
            mx.enable_compile()
    STATUS.update(compile=chosen, compile_source=why)
    return dict(STATUS)
