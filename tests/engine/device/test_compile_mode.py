"""Whether the engine compiles whole graphs (engine.device.compile_mode): on by default on
this CPU, off on an MLX CUDA GPU, forced either way by DIFFNAS_COMPILE; observed on a real
function passed through ``compile_mode.whole``, whose Python body runs once when compiled
and at every call when not, and on the optimizer training picks (fused when eager)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.device import compile_mode

PROBE = textwrap.dedent("""
    import json
    import engine
    import mlx.core as mx
    from engine.device import compile_mode
    from engine.training import train
    calls = []

    def f(x):
        calls.append(1)
        return x * 2 + 1

    g = compile_mode.whole(f)
    for _ in range(3):
        mx.eval(g(mx.ones((4,))))
    optimizer = type(train.make_optimizer(train.TrainConfig())).__name__
    print(json.dumps({"traced": len(calls), "optimizer": optimizer, **compile_mode.STATUS}))
""")


def _probe(**env: str) -> tuple[dict, str]:
    full = {k: v for k, v in os.environ.items() if k != compile_mode.ENV}
    full["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    full.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=full, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_the_cpu_compiles_by_default():
    res, _ = _probe()
    assert res["compile"] == "on" and res["traced"] == 1 and res["optimizer"] == "AdamW"
    assert res["compile_source"] == "auto: CPU or Metal"


def test_off_runs_the_function_at_every_call_and_on_restores_it():
    off, _ = _probe(DIFFNAS_COMPILE="off")
    assert off["compile"] == "off" and off["traced"] == 3 and off["optimizer"] == "FlatAdamW"
    fused, _ = _probe(DIFFNAS_COMPILE="fused")  # whole graphs eager, per-array updates fused
    assert fused["compile"] == "fused" and fused["traced"] == 3
    assert fused["optimizer"] == "FusedAdamW"
    on, _ = _probe(DIFFNAS_COMPILE="On")
    assert on["compile"] == "on" and on["traced"] == 1


def test_a_wrong_value_is_one_line_and_auto_is_used():
    res, err = _probe(DIFFNAS_COMPILE="sometimes")
    assert res["compile"] == "on" and res["traced"] == 1
    lines = [line for line in err.splitlines() if "DIFFNAS_COMPILE" in line]
    assert lines == [("diffnas: DIFFNAS_COMPILE='sometimes' is not one of auto, on, fused, off; "
                      "using auto")]


@pytest.mark.parametrize("cuda_gpu, want", [(True, "off"), (False, "on")])
def test_auto_compiles_everywhere_but_on_a_cuda_gpu(cuda_gpu, want):
    mode, why = compile_mode.decide("auto", cuda_gpu=cuda_gpu)
    assert mode == want and why.startswith("auto: ")
    assert compile_mode.decide("on", cuda_gpu=True)[0] == "on"
    assert compile_mode.decide("fused", cuda_gpu=True)[0] == "fused"
    assert compile_mode.decide("off", cuda_gpu=False)[0] == "off"
    with pytest.raises(ValueError, match="DIFFNAS_COMPILE='x'"):
        compile_mode.decide("x", cuda_gpu=False)
