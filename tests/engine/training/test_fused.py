"""Updates for an engine that runs eagerly (engine.training.fused), per array fused or all
arrays joined: the same clip, AdamW and EMA as MLX's and the engine's own, a state tree
that checkpoints as MLX's does, and eager training runs (DIFFNAS_COMPILE=fused and =off,
each in a fresh process) that match the compiled one."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.training.fused import FlatAdamW, FusedAdamW, ema_update


def _params(seed):
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3, 3, 2), "b": (7,), "emb": (5, 6)}
    return {k: mx.array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}


def _follows_mlx_adamw(mine, params, grads_at, clip=0.0):
    """8 steps of ``mine`` against MLX's AdamW (after MLX's clip): weights and state agree."""
    schedule = optim.join_schedules([optim.linear_schedule(1e-4, 2e-3, 3),
                                     optim.cosine_decay(2e-3, 10, 0.0)], [3])
    theirs = optim.AdamW(learning_rate=schedule, weight_decay=0.05, bias_correction=True)
    mine = mine(schedule, weight_decay=0.05)
    a, b = params(0), params(0)
    for step in range(8):
        grads = grads_at(step)
        if clip:
            a = theirs.apply_gradients(optim.clip_grad_norm(grads, clip)[0], a)
            b = mine.apply_gradients(grads, b, grad_clip=clip)
        else:
            a, b = theirs.apply_gradients(grads, a), mine.apply_gradients(grads, b)
        mx.eval(a, b, theirs.state, mine.state)
    for (k, x), (_, y) in zip(tree_flatten(a), tree_flatten(b), strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=2e-5, atol=2e-6, err_msg=k)
    assert [k for k, _ in tree_flatten(theirs.state)] == [k for k, _ in tree_flatten(mine.state)]
    for (k, x), (_, y) in zip(tree_flatten(theirs.state), tree_flatten(mine.state)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=2e-5, atol=1e-7, err_msg=k)
    return a


def test_fused_adamw_follows_mlx_adamw_with_bias_correction():
    a = _follows_mlx_adamw(FusedAdamW, _params, lambda step: _params(100 + step))
    assert float(np.abs(np.array(a["w"]) - np.array(_params(0)["w"])).max()) > 1e-3  # it moved


def _nested(seed):  # a tree like a model's: dicts and lists, arrays of several shapes
    p = _params(seed)
    return {"blocks": [{"conv": p["w"]}, {"norm": p["b"]}], "emb": p["emb"]}


def test_flat_adamw_follows_mlx_clip_and_adamw_with_bias_correction():
    a = _follows_mlx_adamw(  # gradients growing step by step: the later ones clipped
        FlatAdamW, _nested, lambda step: tree_map(lambda g: g * (0.2 + step), _nested(100 + step)),
        clip=1.5)
    assert float(np.abs(np.array(a["emb"]) - np.array(_nested(0)["emb"])).max()) > 1e-3


def test_flat_adamw_resumes_from_a_state_tree_as_if_never_stopped():
    # A checkpoint stores the state tree and assigns it back, here to an optimizer that went
    # on training in between: the joined moments must follow the tree, not the detour.
    def copy(tree):
        return tree_unflatten([(k, mx.array(np.array(v))) for k, v in tree_flatten(tree)])

    def run(detour):
        opt, w = FlatAdamW(1e-2, weight_decay=0.01), _nested(0)
        for step in range(6):
            if detour and step == 3:
                saved_state, saved_w = copy(opt.state), copy(w)
                for j in range(2):
                    w = opt.apply_gradients(_nested(300 + j), w)
                    mx.eval(w, opt.state)
                opt.state, w = saved_state, saved_w
            w = opt.apply_gradients(_nested(200 + step), w)
            mx.eval(w, opt.state)
        return w

    for (k, x), (_, y) in zip(tree_flatten(run(False)), tree_flatten(run(True))):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-6, atol=1e-7, err_msg=k)


def test_flat_adamw_follows_the_arrays_trained_when_they_change():
    # A module frozen midway: its arrays leave the gradients, the others go on as MLX's do.
    theirs = optim.AdamW(learning_rate=1e-2, weight_decay=0.01, bias_correction=True)
    mine = FlatAdamW(1e-2, weight_decay=0.01)
    a, b = _nested(0), _nested(0)
    for step in range(6):
        grads = _nested(400 + step)
        if step >= 3:
            del grads["emb"]
        a = {**a, **theirs.apply_gradients(grads, a)}
        b = {**b, **mine.apply_gradients(grads, b)}
        mx.eval(a, b, theirs.state, mine.state)
    for (k, x), (_, y) in zip(tree_flatten(a), tree_flatten(b), strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=2e-5, atol=2e-6, err_msg=k)


def test_ema_update_is_the_weighted_mean():
    e, p = _params(1), _params(2)
    want = tree_map(lambda x, y: 0.9 * x + (1 - 0.9) * y, e, p)
    for (k, x), (_, y) in zip(tree_flatten(ema_update(e, p, 0.9)), tree_flatten(want)):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-6, atol=1e-7, err_msg=k)


TRAIN = textwrap.dedent("""
    import json
    import engine
    import numpy as np
    from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
    from engine.device import compile_mode
    from engine.training import train
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
    cfg = Config(unet=UNetConfig(image_size=8, base_width=8, width_mults=(1, 2), norm_groups=4,
                                 time_emb_dim=16),
                 schedule=ScheduleConfig(steps=4),
                 train=TrainConfig(steps=6, batch_size=8, warmup_steps=2, eval_every=6))
    state = train.init_state(cfg)
    train.train(state, images, images[:16])
    print(json.dumps({"compile": compile_mode.STATUS["compile"],
                      "optimizer": type(state.optimizer).__name__,
                      "losses": [p.train_loss for p in state.history],
                      "ema": float(np.abs(np.array(state.ema["conv_in"]["weight"])).sum())}))
""")


def _train(mode):
    env = {**os.environ, "DIFFNAS_COMPILE": mode,
           "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    out = subprocess.run([sys.executable, "-c", TRAIN], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_eager_runs_train_as_the_compiled_one():
    compiled = _train("on")
    assert (compiled["compile"], compiled["optimizer"]) == ("on", "AdamW")
    for mode, optimizer in (("fused", "FusedAdamW"), ("off", "FlatAdamW")):
        eager = _train(mode)
        assert (eager["compile"], eager["optimizer"]) == (mode, optimizer)
        assert len(eager["losses"]) == len(compiled["losses"]) > 0
        np.testing.assert_allclose(eager["losses"], compiled["losses"], rtol=1e-4)
        assert abs(eager["ema"] / compiled["ema"] - 1) < 1e-4
