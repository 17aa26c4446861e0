"""MLX's CUDA kernel cache (engine.device.kernel_cache): a persistent folder by default, set
before mlx loads, inherited by child processes, overridable; nothing on a CPU-only install.

This machine has no GPU: the end-to-end cases make a fresh interpreter believe an MLX CUDA
backend is installed by putting a ``mlx_cuda_13`` dist-info on its path (all that
:func:`kernel_cache.cuda_backend` reads); MLX reading the variable is checked on the GPU
by ``benchmarks/gpu/h200.sh`` (cold vs warm cache).
"""

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from importlib import metadata
from pathlib import Path

import pytest

from engine.device import kernel_cache

MLX_VERSION = metadata.version("mlx")

PROBE = textwrap.dedent("""
    import json, os, subprocess, sys
    import engine
    from engine.device import kernel_cache
    import mlx.core as mx
    child = subprocess.run([sys.executable, "-c",
                            "import os; print(os.environ.get('MLX_PTX_CACHE_DIR'))"],
                           capture_output=True, text=True).stdout.strip()
    print(json.dumps({"env": os.environ.get("MLX_PTX_CACHE_DIR"), "child": child,
                      **kernel_cache.describe()}))
""")


@pytest.fixture()
def probe(fake_cuda_install):
    return partial(_probe, fake_cuda_install)


def _probe(fake_cuda_install, tmp_path: Path, cuda: bool, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in (kernel_cache.MLX_ENV, kernel_cache.DIFFNAS_ENV)}
    full["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    paths = [str(fake_cuda_install(tmp_path))] if cuda else []
    full["PYTHONPATH"] = os.pathsep.join(paths + [str(Path(__file__).resolve().parents[3])])
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=full, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_default_is_a_persistent_per_version_folder_set_by_import_engine(tmp_path, probe):
    res = probe(tmp_path, cuda=True)
    want = str(tmp_path / "xdg" / "diffnas" / "mlx-ptx" / MLX_VERSION)
    assert res["env"] == want and res["kernel_cache"] == want
    assert res["kernel_cache_source"] == "diffnas default"
    # ``import engine`` sets it before anything in engine loads mlx (engine.device's first
    # statement; the compile mode, which imports mlx on a CUDA install, comes after it).
    assert Path(want).is_dir()
    assert res["child"] == want  # a trial process inherits it
    assert res["kernel_cache_modules"] == 0


def test_a_given_mlx_variable_wins(tmp_path, probe):
    mine = str(tmp_path / "mine")
    res = probe(tmp_path, cuda=True, MLX_PTX_CACHE_DIR=mine)
    assert res["env"] == mine and res["kernel_cache_source"] == "MLX_PTX_CACHE_DIR (given)"
    assert not (tmp_path / "xdg" / "diffnas" / "mlx-ptx").exists()


def test_diffnas_variable_moves_the_parent_or_turns_it_off(tmp_path, probe):
    res = probe(tmp_path, cuda=True, DIFFNAS_KERNEL_CACHE=str(tmp_path / "shared"))
    assert res["env"] == str(tmp_path / "shared" / "mlx-ptx" / MLX_VERSION)
    off = probe(tmp_path / "b", cuda=True, DIFFNAS_KERNEL_CACHE="off")
    assert off["env"] is None and off["kernel_cache"] == "mlx default"


def test_nothing_is_set_without_a_cuda_backend(tmp_path, probe):
    res = probe(tmp_path, cuda=False)
    assert res["env"] is None and res["kernel_cache"] == "n/a"
    assert not (tmp_path / "xdg" / "diffnas" / "mlx-ptx").exists()


def test_an_uncreatable_folder_keeps_mlx_default(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {"DIFFNAS_KERNEL_CACHE": str(blocker)}
    status = kernel_cache.configure(env, cuda=True)
    assert kernel_cache.MLX_ENV not in env  # MLX would turn its disk cache off otherwise
    assert status["kernel_cache"] == "mlx default"
    assert str(blocker) in status["kernel_cache_source"]


def test_describe_counts_cached_modules(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    status = kernel_cache.configure(env, cuda=True)
    folder = Path(status["kernel_cache"])
    (folder / "a.ptx").write_bytes(b"x")
    (folder / "long" / "b.ptx").parent.mkdir()
    (folder / "long" / "b.ptx").write_bytes(b"x")
    saved = dict(kernel_cache.STATUS)
    try:
        kernel_cache.STATUS.update(status)
        assert kernel_cache.describe()["kernel_cache_modules"] == 2
    finally:
        kernel_cache.STATUS.clear()
        kernel_cache.STATUS.update(saved)
    assert json.dumps(kernel_cache.describe())  # plain data for the device report
