"""The BLAS binding (engine.device.blas), each case in a fresh interpreter (a process binds
once, before mlx loads): the lock file's OpenBLAS with the mlx wheel's libgfortran, the
reference BLAS on request, and one line of advice when nothing fast can be loaded."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine.device import blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the binding is Linux-only")

PROBE = textwrap.dedent("""
    import json, subprocess, sys
    import engine
    from engine.device import blas
    from engine.device.bench import device_fingerprint
    import mlx.core as mx, numpy as np
    a = mx.random.normal((256, 256), key=mx.random.key(1))
    error = float(np.abs(np.array(a @ a) - np.array(a) @ np.array(a)).max())
    maps = sorted({l.split()[-1] for l in open("/proc/self/maps")
                   if "openblas" in l or "gfortran" in l})
    blas.bind()  # a second bind says nothing more
    child = subprocess.run([sys.executable, "-c", "import engine"], capture_output=True,
                           text=True).stderr
    print(json.dumps({"name": blas.BLAS_NAME, "fingerprint": device_fingerprint()["blas"],
                      "error": error, "maps": maps, "child_stderr": child}))
""")


def probe(tmp_path, **env: str) -> tuple[dict, str]:
    """What a fresh ``import engine`` bound, and what it said on stderr."""
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    full.pop("DIFFNAS_BLAS_WARNED", None)
    if "DIFFNAS_BLAS" not in env:
        full.pop("DIFFNAS_BLAS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], check=False,
                         capture_output=True, text=True, env=full, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_the_lock_files_openblas_is_bound_with_the_mlx_wheels_libgfortran(tmp_path):
    env_library = [p for p in blas.candidates() if "cmeel.prefix" in p]
    if not env_library:
        pytest.skip("cmeel-openblas is not installed for this platform")
    got, stderr = probe(tmp_path)
    assert got["name"].startswith("openblas ") and got["name"].endswith(f"({env_library[0]})")
    assert got["fingerprint"] == got["name"] and got["error"] < 1e-3 and stderr == ""
    gfortran = [p for p in got["maps"] if "gfortran" in p and "numpy.libs" not in p]
    renamed = [p for p in gfortran if p.startswith(str(tmp_path / "cache"))]
    assert renamed and all("mlx_cpu.libs" in p or p in renamed for p in gfortran)
    with open(renamed[0], "rb") as f:
        [(_, soname)] = blas._dynamic_strings(f.read(), blas._DT_SONAME)
    assert soname == "libgfortran.so.5"


def test_reference_turns_the_binding_off_silently(tmp_path):
    got, stderr = probe(tmp_path, DIFFNAS_BLAS="reference")
    assert got["name"] == blas.REFERENCE == got["fingerprint"]
    assert not [p for p in got["maps"] if "/libopenblas" in p] and stderr == ""
    assert got["error"] < 1e-3


def test_no_fast_blas_is_said_once_in_one_line_with_the_fix(tmp_path):
    missing = str(tmp_path / "libopenblas.so.0")
    got, stderr = probe(tmp_path, DIFFNAS_BLAS=missing)
    assert got["name"] == blas.REFERENCE
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffnas: no fast BLAS could be loaded")
    assert "uv sync" in lines[0] and "libopenblas0-pthread" in lines[0]
    assert got["child_stderr"] == ""  # a worker's trial processes do not repeat it


def test_a_one_core_build_is_refused_on_a_cpu_without_its_instructions():
    skylakex = b"\x7fELF...\0SKYLAKEX\0..."
    assert blas._missing_flag(skylakex, ["sse2", "avx2"]) == ("SKYLAKEX", "avx512f")
    assert blas._missing_flag(skylakex, ["avx2", "avx512f"]) is None
    assert blas._missing_flag(b"DYNAMIC_ARCH\0SKYLAKEX\0", ["sse2"]) is None
