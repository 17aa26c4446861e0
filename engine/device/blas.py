"""Bind MLX's CPU backend to an optimised BLAS before ``mlx.core`` loads.

The Linux ``mlx[cpu]`` wheel links netlib's reference BLAS (about 2.5-6 GFLOP/s on a
2-core x86 machine). Opening an OpenBLAS with ``RTLD_GLOBAL`` before MLX's shared
library is loaded makes the dynamic linker resolve MLX's ``cblas_*``/``sgemm_`` symbols to
OpenBLAS instead (60-300 GFLOP/s on the same machine), with no ``LD_PRELOAD`` and no
re-exec. This module must be imported before ``mlx``.

Where the library comes from, first found first:

1. the environment: the ``cmeel-openblas`` wheel that the lock file installs on Linux
   (``site-packages/cmeel.prefix/lib/libopenblas.so.0``). It needs ``libgfortran.so.5``;
   the ``mlx[cpu]`` wheel bundles one under a hashed name
   (``mlx_cpu.libs/libgfortran-<hash>.so.5*``), so a copy of that file whose ELF ``SONAME``
   reads ``libgfortran.so.5`` is kept in a cache folder and loaded first: no system
   package is needed. Without the bundled copy, the system's ``libgfortran.so.5`` is tried;
2. Debian's OpenBLAS (``apt-get install libopenblas0-pthread``), the fallback.

Where none loads, one line on stderr says so and how to fix it (once per process tree).
Set ``DIFFNAS_BLAS=reference`` to keep the wheel's own BLAS (for side-by-side
benchmarks), or ``DIFFNAS_BLAS=/path/to/libopenblas.so`` to choose a library.
``OPENBLAS_NUM_THREADS`` defaults to 1 so that several workers can share a machine.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ENV_LIBRARY = "cmeel.prefix/lib/libopenblas.so.0"
_SYSTEM = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_GFORTRAN = "libgfortran.so.5"
_WARNED_ENV = "DIFFNAS_BLAS_WARNED"  # inherited by child processes: the warning is said once
# Cores that one-core OpenBLAS builds target, and the CPU flag each needs (/proc/cpuinfo
# "flags" on x86, "Features" on arm64); the PyPI wheels are SKYLAKEX and NEOVERSEN2 builds.
_CORE_FLAGS = {"SAPPHIRERAPIDS": "avx512_bf16", "COOPERLAKE": "avx512_bf16",
               "SKYLAKEX": "avx512f", "ZEN": "avx2", "HASWELL": "avx2",
               "NEOVERSEN2": "sve", "NEOVERSEV1": "sve", "ARMV8SVE": "sve", "A64FX": "sve"}
_DT_NEEDED, _DT_SONAME, _SHT_DYNAMIC = 1, 14, 6

REFERENCE = "reference (netlib, bundled with mlx)"
BLAS_NAME = REFERENCE
"""Which BLAS MLX's CPU backend calls in this process; set by :func:`bind`."""

FIX = ("diffnas: no fast BLAS could be loaded, MLX runs the reference BLAS (about 30x "
       "slower); fix: `uv sync` (installs cmeel-openblas) or `apt-get install "
       "libopenblas0-pthread`{why}")


def candidates() -> list[str]:
    """The OpenBLAS libraries to try, in order: the environment's, then the system's.

    Returns:
        Existing paths; empty under ``DIFFNAS_BLAS=reference``; only the named one under
        ``DIFFNAS_BLAS=/path``.
    """
    wanted = os.environ.get("DIFFNAS_BLAS", "auto")
    if wanted == "reference":
        return []
    if wanted != "auto":
        return [wanted]
    found = [str(Path(d) / _ENV_LIBRARY) for d in _site_dirs()] + list(_SYSTEM)
    return [p for p in dict.fromkeys(found) if os.path.exists(p)]


def _site_dirs() -> list[str]:
    return list(dict.fromkeys([sysconfig.get_path("platlib"), sysconfig.get_path("purelib"),
                               *(p for p in sys.path if p.endswith("site-packages"))]))


def _preloaded() -> str | None:
    """The OpenBLAS already mapped into this process (``LD_PRELOAD`` or an earlier bind)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "/libopenblas" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def bind() -> str:
    """Load an optimised BLAS globally if one can be; return the name of the BLAS in use.

    Returns:
        ``accelerate`` on macOS; ``openblas <version and kernel> (<path>)`` when an OpenBLAS
        is bound; :data:`REFERENCE` otherwise (after one line on stderr, unless
        ``DIFFNAS_BLAS=reference`` asked for it).
    """
    global BLAS_NAME
    if sys.platform == "darwin":
        BLAS_NAME = "accelerate"
        return BLAS_NAME
    already = _preloaded()
    if already:
        BLAS_NAME = _describe(already)
        return BLAS_NAME
    if "mlx.core" in sys.modules:
        # Too late: MLX already resolved its BLAS symbols to the bundled library.
        return BLAS_NAME
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    path, errors = _load_first(candidates())
    if path is not None:
        BLAS_NAME = _describe(path)
    elif os.environ.get("DIFFNAS_BLAS") != "reference":
        _warn_once(f" ({'; '.join(errors)})" if errors else "")
    return BLAS_NAME


def _load_first(paths: list[str]) -> tuple[str | None, list[str]]:
    """The first of ``paths`` that loads, and why each one before it did not."""
    errors: list[str] = []
    for path in paths:
        try:
            _load(path)
            return path, errors
        except OSError as err:
            errors.append(str(err))
    return None, errors


def _load(path: str) -> None:
    """Open ``path`` with ``RTLD_GLOBAL``, its ``libgfortran.so.5`` first when it needs one.

    Raises:
        OSError: it cannot be loaded, or it was built for instructions this CPU lacks.
    """
    _check_cpu(path)
    if _GFORTRAN in _needed(path):
        _load_gfortran()
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _check_cpu(path: str) -> None:
    """Refuse an OpenBLAS built for one core whose instructions this CPU lacks.

    The PyPI wheels are built for one core each (``SKYLAKEX``: AVX-512; ``NEOVERSEN2``:
    SVE), not ``DYNAMIC_ARCH`` like Debian's, and would stop the process with SIGILL on a
    CPU without those instructions.

    Raises:
        OSError: naming the library, the core and the missing CPU flag.
    """
    try:
        data = Path(path).read_bytes()
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return
    missing = _missing_flag(data, flags)
    if missing:
        raise OSError(f"{path}: built for {missing[0]} only; this CPU lacks {missing[1]}")


def _missing_flag(library: bytes, cpu_flags: list[str]) -> tuple[str, str] | None:
    """``(core, flag)`` when ``library`` is a one-core build for a core whose flag the CPU
    lacks; ``None`` for a ``DYNAMIC_ARCH`` build or a CPU that has it."""
    if b"DYNAMIC_ARCH" in library:
        return None
    for core, flag in _CORE_FLAGS.items():
        if b"\0" + core.encode() + b"\0" in library and flag not in cpu_flags:
            return core, flag
    return None


def _describe(path: str) -> str:
    """``openblas <openblas_get_config()> (<path>)``: the version and kernel that run."""
    try:
        get_config = ctypes.CDLL(path).openblas_get_config
        get_config.restype = ctypes.c_char_p
        config = get_config().decode().removeprefix("OpenBLAS ")
    except (OSError, AttributeError):
        config = ""
    return f"openblas {config} ({path})".replace("  ", " ")


def _warn_once(why: str) -> None:
    if os.environ.get(_WARNED_ENV):
        return
    os.environ[_WARNED_ENV] = "1"
    print(FIX.format(why=why), file=sys.stderr)


# -- libgfortran.so.5 from the mlx wheel -----------------------------------------------------


def _load_gfortran() -> None:
    """Make ``libgfortran.so.5`` resolvable: the mlx wheel's copy renamed, else the system's.

    Raises:
        OSError: neither can be loaded.
    """
    bundled = sorted(p for d in _site_dirs()
                     for p in glob.glob(str(Path(d) / "mlx_cpu.libs" / "libgfortran-*.so.5*")))
    for source in bundled:
        try:
            ctypes.CDLL(str(_renamed(Path(source))), mode=ctypes.RTLD_GLOBAL)
            return
        except (OSError, ValueError, RuntimeError, struct.error):
            continue  # an unwritable cache or an unexpected file: try the system's
    ctypes.CDLL(_GFORTRAN, mode=ctypes.RTLD_GLOBAL)


def _renamed(source: Path) -> Path:
    """A copy of ``source`` whose ``SONAME`` is ``libgfortran.so.5``, beside links to the
    hashed libraries it needs (its ``RPATH`` is ``$ORIGIN``); made once, atomically.

    The dynamic linker matches a ``DT_NEEDED`` entry against the ``SONAME`` of the objects
    already loaded, so once this copy is loaded, OpenBLAS's ``libgfortran.so.5`` resolves
    to it. The new name is shorter than the hashed one, so it is written in place.
    """
    folder = _cache() / source.name
    target = folder / _GFORTRAN
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    data = bytearray(source.read_bytes())
    [(offset, old)] = _dynamic_strings(bytes(data), _DT_SONAME)
    if len(old) < len(_GFORTRAN):
        raise ValueError(f"{source}: SONAME {old!r} is shorter than {_GFORTRAN!r}")
    data[offset:offset + len(old)] = _GFORTRAN.encode().ljust(len(old), b"\0")
    for _, name in _dynamic_strings(bytes(data), _DT_NEEDED):
        if (source.parent / name).exists() and not (folder / name).exists():
            try:
                os.symlink(source.parent / name, folder / name)
            except FileExistsError:  # another process made it meanwhile
                pass
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)
    return target


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffnas" / "blas"


def _needed(path: str) -> list[str]:
    try:
        return [name for _, name in _dynamic_strings(Path(path).read_bytes(), _DT_NEEDED)]
    except (OSError, ValueError, struct.error):
        return []


def _dynamic_strings(elf: bytes, tag: int) -> list[tuple[int, str]]:
    """``(file offset, string)`` of each dynamic entry ``tag`` of a 64-bit little-endian ELF.

    Raises:
        ValueError: not a 64-bit little-endian ELF file.
    """
    if elf[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    # Section header: name, type, flags, addr, offset, size, link, info, align, entsize.
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
                for i in range(shnum)]
    found = []
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strtab = sections[link][4]
        for entry in range(offset, offset + size, 16):
            d_tag, d_val = struct.unpack_from("<qQ", elf, entry)
            if d_tag == tag:
                start = strtab + d_val
                found.append((start, elf[start:elf.index(b"\0", start)].decode()))
    return found


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """OpenBLAS on ``n`` threads inside the block (no-op where another BLAS runs).

    With a batch split over streams or processes, each part's GEMMs take one core: a
    multi-threaded GEMM per part would put twice as many threads as cores to work.
    """
    lib = ctypes.CDLL(None)
    get = getattr(lib, "openblas_get_num_threads", None)
    if get is None:
        yield
        return
    before = get()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)
