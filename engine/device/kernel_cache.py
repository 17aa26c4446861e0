"""A persistent on-disk cache for the kernels that MLX's CUDA backend compiles at run time.

MLX on CUDA compiles its kernels (element-wise, fused ``mx.compile`` graphs, indexing, ...)
with NVRTC on first use. One compiled training step of the demo U-Net took more than 90 s
on a fresh H200, and every trial runs in a process of its own (``workers.process``), so
only a disk cache carries compiled kernels from one trial, or one study, to the next.

How MLX reads it (``mlx/backend/cuda/jit_module.cpp``, ``ptx_cache_dir()``): the variable
``MLX_PTX_CACHE_DIR`` is read with ``getenv`` once per process, when the first kernel is
built (a function-local static), not at import. Unset, MLX uses
``<temp dir>/mlx/<version>/ptx``, which a fresh or rebooted machine (or a different
``TMPDIR``) starts empty. A folder MLX cannot create turns the disk cache off silently, and
a folder it names is used as is (no version sub-folder). MLX writes each module as
``<name>.ptx`` (a cubin on recent NVRTC) plus ``<name>.txt`` and ``<name>.cu``.

:func:`configure` therefore sets ``MLX_PTX_CACHE_DIR`` in ``os.environ`` (inherited by every
child process) before ``mlx.core`` loads: ``engine.device`` calls it on import, which
``import engine`` triggers before anything imports mlx. The default is
``$XDG_CACHE_HOME/diffnas/mlx-ptx/<mlx version>`` (``~/.cache/...`` without XDG), one per
MLX version because a cached module is looked up by name only. A ``MLX_PTX_CACHE_DIR``
already set wins; ``DIFFNAS_KERNEL_CACHE=/path`` chooses the parent folder,
``DIFFNAS_KERNEL_CACHE=off`` leaves MLX's default alone. Only where an MLX CUDA backend is
installed (``mlx-cuda-*``); on a CPU-only or Metal install nothing is set or created.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

MLX_ENV = "MLX_PTX_CACHE_DIR"
DIFFNAS_ENV = "DIFFNAS_KERNEL_CACHE"
CUDA_DISTRIBUTIONS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")

STATUS: dict[str, Any] = {"kernel_cache": "n/a", "kernel_cache_source": "not configured"}
"""What :func:`configure` did in this process, for the device report."""


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cuda_backend() -> str | None:
    """The installed MLX CUDA backend distribution (e.g. ``mlx-cuda-13``), else None.

    Read from package metadata: importing mlx here would start the backend too early.
    """
    return next((d for d in CUDA_DISTRIBUTIONS if _installed(d)), None)


def default_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """``$DIFFNAS_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/diffnas`` (or ``~/.cache/diffnas``),
    then ``mlx-ptx/<mlx version>``."""
    parent = environ.get(DIFFNAS_ENV)
    if not parent:
        xdg = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        parent = str(Path(xdg) / "diffnas")
    return Path(parent).expanduser() / "mlx-ptx" / (_installed("mlx") or "unknown")


def configure(environ: dict[str, str] | os._Environ[str] | None = None,
              cuda: bool | None = None) -> dict[str, Any]:
    """Point MLX's kernel cache at a persistent folder, unless told otherwise.

    Args:
        environ: the environment to read and set (default ``os.environ``, which child
            processes inherit).
        cuda: whether an MLX CUDA backend is installed (default: :func:`cuda_backend`).

    Returns:
        ``{"kernel_cache": folder or "n/a" or "mlx default", "kernel_cache_source": why}``;
        also kept in :data:`STATUS`.
    """
    env = os.environ if environ is None else environ
    cuda = cuda_backend() is not None if cuda is None else cuda
    if env.get(MLX_ENV):
        status = {"kernel_cache": env[MLX_ENV], "kernel_cache_source": f"{MLX_ENV} (given)"}
    elif not cuda:
        status = {"kernel_cache": "n/a", "kernel_cache_source": "no MLX CUDA backend"}
    elif env.get(DIFFNAS_ENV, "").lower() == "off":
        status = {"kernel_cache": "mlx default", "kernel_cache_source": f"{DIFFNAS_ENV}=off"}
    else:
        folder = default_dir(env)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # MLX would turn its disk cache off: keep its /tmp default
            status = {"kernel_cache": "mlx default",
                      "kernel_cache_source": f"cannot create {folder}: {exc.strerror}"}
        else:
            env[MLX_ENV] = str(folder)
            status = {"kernel_cache": str(folder), "kernel_cache_source": "diffnas default"}
    if environ is None:
        STATUS.update(status)
    return status


def modules() -> set[str] | None:
    """The names of the modules in this process's cache now (None: no cache folder)."""
    folder = Path(STATUS["kernel_cache"])
    if not (folder.is_absolute() and folder.is_dir()):
        return None
    return {f.stem for f in folder.rglob("*.ptx")}


def describe() -> dict[str, Any]:
    """The cache this process uses and how many compiled modules it holds now."""
    out = dict(STATUS)
    names = modules()
    if names is not None:
        out["kernel_cache_modules"] = len(names)
    return out
