#!/usr/bin/env python3
"""Side-by-side throughput of the same U-Net in MLX (engine.model.unet) and PyTorch (torch_unet).

Each framework runs in its own interpreter; this one file is the worker for both and
the driver that launches them:

  uv run python benchmarks/throughput.py --framework mlx [--config demo] ...
  /tmp/torchenv/bin/python benchmarks/throughput.py --framework torch [--threads 1] ...
  python3 benchmarks/throughput.py --compare [--mlx-python ...] [--torch-python ...]
  python3 benchmarks/throughput.py --device-report

The torch worker never imports ``engine`` or ``mlx``; the MLX worker imports ``engine``
before ``mlx`` (so that ``engine.device.blas`` can bind OpenBLAS; ``DIFFNAS_BLAS=reference``
keeps the BLAS bundled with the mlx wheel). Workers print one JSON line prefixed with
``@@RESULT`` on stdout; progress goes to stderr. See benchmarks/README.md.

Protocol (both frameworks): warm-up first (compilation and first touch excluded), then
the median of ``--windows`` (>= 5) timed windows, each synchronised (``mx.eval`` /
``torch.cuda.synchronize``). A training window runs enough steps to last about
``--min-window-s``; a sampling window is one full DDIM run. The spread is IQR / median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "@@RESULT "

CONFIGS: dict[str, dict[str, Any]] = {
    # The demo-size model of the task, and a smaller one without attention.
    "demo": {"image_size": 16, "channels": 1, "base_width": 32, "width_mults": [1, 2],
             "num_res_blocks": 1, "attn_levels": [1], "head_dim": 32},
    "small": {"image_size": 16, "channels": 1, "base_width": 16, "width_mults": [1, 2],
              "num_res_blocks": 1, "attn_levels": [], "head_dim": 32},
}
# Selectable by name, not run by default (too slow for a CPU): the issue-16 GPU model,
# width 128, 32 px, 2 res blocks, attention at 16 px; 23,849,217 params, 12.3 GFLOP/forward.
LARGE: dict[str, dict[str, Any]] = {
    "large": {"image_size": 32, "channels": 1, "base_width": 128, "width_mults": [1, 2, 2],
              "num_res_blocks": 2, "attn_levels": [1], "head_dim": 32},
}
MLX_VARIANTS = ("compiled", "eager", "compiled-bf16")  # compiled-bf16: TrainConfig.dtype
# Only for the MLX <-> torch equivalence check: every layer kind the port has to get
# right (the VARIANTS of tests/engine/test_unet.py plus a dropout one).
CHECK_ONLY: dict[str, dict[str, Any]] = {
    "v-attention": {"base_width": 16, "norm_groups": 4, "width_mults": [1, 2, 2],
                    "attn_levels": [1, 2], "head_dim": 16, "num_res_blocks": 2},
    "v-transposed-relu": {"base_width": 16, "norm_groups": 8, "resample": "transposed",
                          "activation": "relu"},
    "v-separable-layernorm-gelu": {"base_width": 16, "separable": True, "norm": "layer",
                                   "activation": "gelu", "channels": 3, "image_size": 8},
    "v-dropout": {"base_width": 16, "dropout": 0.1},
}

# engine.sampling.schedules / engine.sampling.diffusion constants and the cosine schedule, duplicated so
# that the torch worker does not import engine.
T_MIN = 1e-3
ALPHA_BAR_MIN = 1e-5
# ScheduleConfig defaults: cosine schedule, eps prediction, DDIM, trailing spacing.
LR = 2e-3             # TrainConfig defaults: AdamW lr 2e-3, weight decay 0, clip 1.0
GRAD_CLIP = 1.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_configs(names: list[str]) -> dict[str, dict[str, Any]]:
    """Built-in names (CONFIGS, CHECK_ONLY) or paths to UNetConfig / Config JSON files."""
    out = {}
    for name in names:
        if name in CONFIGS:
            out[name] = dict(CONFIGS[name])
        elif name in CHECK_ONLY or name in LARGE:
            out[name] = dict({**CHECK_ONLY, **LARGE}[name])
        elif name.endswith(".json") and Path(name).exists():
            data = json.loads(Path(name).read_text())
            out[Path(name).stem] = data["unet"] if isinstance(data.get("unet"), dict) else data
        else:
            raise SystemExit(f"unknown config {name!r}: use {', '.join([*CONFIGS, *LARGE])} "
                             "or a .json")
    return out


def ddim_grid(steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trailing spacing + t = 0, cosine alpha/sigma (engine.sampling.schedules.grid, duplicated)."""
    t = np.concatenate([np.arange(steps, 0, -1) / steps, [0.0]])
    s = 0.008
    ab = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    ab = np.clip(ab, ALPHA_BAR_MIN, 1.0)
    return t, np.sqrt(ab), np.sqrt(1.0 - ab)


def _skipped(skip: list[str], config: str, metric: str) -> bool:
    """``--skip`` entries are ``metric`` or ``config:metric`` (e.g. ``demo:sample_b16``)."""
    return metric in skip or f"{config}:{metric}" in skip


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by --clock; cpu: this process's CPU seconds, all threads


def timed(fn: Callable[[], Any], sync: Callable[[], None], windows: int, warmup: int,
          min_window_s: float) -> dict[str, Any]:
    """Seconds per call of ``fn``: median over ``windows`` windows of ``k`` synced calls.

    ``first_call_s``: wall seconds of the first call (compilation, kernel JIT, autotuning).
    """
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
        sync()
    start = clock()
    fn()
    sync()
    unit = clock() - start
    k = max(1, math.ceil(min_window_s / max(unit, 1e-9))) if min_window_s > 0 else 1
    samples = []
    for _ in range(max(windows, 5)):
        start = clock()
        for _ in range(k):
            fn()
            sync()
        samples.append((clock() - start) / k)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_s": float(med), "spread": float((q3 - q1) / med), "calls_per_window": k,
            "first_call_s": round(first, 4), "samples_s": [round(x, 6) for x in samples]}


def _record(args: argparse.Namespace, framework: str, config: str, row: str, variant: str,
            stat: dict[str, Any]) -> None:
    """Append one measurement to ``--partial`` (JSON lines) as soon as it exists, so that a
    run cut short by a time limit keeps what it measured."""
    _log(f"[{framework}] {config} {row} {variant}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stat.items()
        if k not in ("samples_s",)))
    if args.partial:
        with open(args.partial, "a") as f:
            f.write(json.dumps({"framework": framework, "config": config, "row": row,
                                "variant": variant, **stat}) + "\n")


def _measure(args: argparse.Namespace, framework: str, config: str, row: str, variant: str,
             rows: dict[str, Any], build: Callable[[], tuple[Callable[[], Any], float]],
             sync: Callable[[], None], peak: tuple[Callable[[], None], Callable[[], Any]],
             per_call: float, unit: str) -> None:
    """Build one variant, time it, record it in ``rows[row][variant]``; an error in one
    variant is recorded in one line and the run goes on."""
    reset, read = peak
    try:
        reset()
        fn, prepare_s = build()
        warm = args.train_warmup if row.startswith("train") else 1
        win = args.min_window_s if row.startswith("train") else 0.0
        stat = timed(fn, sync, args.windows, warm, win)
        stat["prepare_s"] = round(prepare_s, 4)
        stat[unit] = per_call / stat["median_s"] if unit == "images_per_s" \
            else stat["median_s"] * 1e3
        stat["peak_mib"] = read()
    except Exception as exc:  # noqa: BLE001 (one variant's failure must not end the run)
        stat = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    rows.setdefault(row, {})[variant] = stat
    _record(args, framework, config, row, variant, stat)


# ----------------------------------------------------------------------------- MLX worker

def _mlx_setup(device: str) -> Any:
    sys.path.insert(0, str(ROOT))
    # The MLX variants choose compiled or eager themselves: the engine's compile mode must
    # not turn the compiled ones eager (its default on a CUDA GPU, engine.device.compile_mode).
    os.environ.setdefault("DIFFNAS_COMPILE", "on")
    # engine first: it binds OpenBLAS before mlx loads (unless DIFFNAS_BLAS=reference).
    import engine  # noqa: F401, I001
    import mlx.core as mx

    if device == "gpu" or (device == "auto" and mx.is_available(mx.gpu)):
        mx.set_default_device(mx.gpu)
    elif device == "cpu":
        mx.set_default_device(mx.cpu)
    return mx


def mlx_fingerprint(device: str = "auto") -> dict[str, Any]:
    mx = _mlx_setup(device)
    from engine.device.bench import device_fingerprint

    fp = device_fingerprint()
    fp["default_device"] = str(mx.default_device())
    fp["OPENBLAS_NUM_THREADS"] = os.environ.get("OPENBLAS_NUM_THREADS")
    fp["DIFFNAS_BLAS"] = os.environ.get("DIFFNAS_BLAS", "auto")
    from engine.device import kernel_cache

    fp.update(kernel_cache.describe())
    fp["python"] = platform.python_version()
    return fp


def mlx_worker(args: argparse.Namespace) -> dict[str, Any]:
    mx = _mlx_setup(args.mlx_device)
    results = {"framework": "mlx", "device": mlx_fingerprint(args.mlx_device), "configs": {}}
    for name, data in _load_configs(args.config).items():
        _log(f"[mlx] {name} on {mx.default_device()}")
        results["configs"][name] = _mlx_config(args, name, data)
    return results


def _mlx_eager_step(state: Any) -> Callable[[Any, Any], Any]:
    """``engine.training.train.compiled_update`` without ``mx.compile`` (same loss, clip and
    optimizer: :class:`engine.training.fused.FlatAdamW` where whole graphs are not compiled)."""
    from mlx import nn

    from engine.sampling.diffusion import diffusion_loss
    from engine.training.fused import clip_and_update

    cfg, model, opt = state.config, state.model, state.optimizer
    loss_and_grad = nn.value_and_grad(model, lambda x0, key: diffusion_loss(
        model, x0, key, cfg.schedule.prediction, cfg.schedule.beta_schedule))

    def step(x0: Any, key: Any) -> Any:
        loss, grads = loss_and_grad(x0, key)
        clip_and_update(opt, model, grads, cfg.train.grad_clip)
        return loss

    return step


def _mlx_dump(ucfg: Any, path: Path) -> int:
    """Write perturbed random weights, an input and the MLX output for the torch check."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from engine.model.cost import param_count
    from engine.model.unet import UNet

    mx.random.seed(1)
    model = UNet(ucfg)
    model.eval()  # dropout off, as torch's model.eval()
    # Perturb every parameter (norm scales are 1 and biases 0 at init) so that a wrongly
    # mapped tensor cannot hide behind its default value.
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    x = mx.random.normal((3, ucfg.image_size, ucfg.image_size, ucfg.channels))
    t = mx.array([T_MIN, 0.37, 1.0])
    y = model(x, t)
    mx.eval(y)
    weights = {f"w:{k}": np.array(v) for k, v in tree_flatten(model.parameters())}
    np.savez(path, x=np.array(x), t=np.array(t), y=np.array(y),
             params_cost=param_count(ucfg), params_model=model.num_params(), **weights)
    return model.num_params()


def _mlx_config(args: argparse.Namespace, name: str, data: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
    from engine.model.cost import flops, param_count
    from engine.training import train as etrain

    ucfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    res: dict[str, Any] = {"params_cost": param_count(ucfg), "gflops_fwd_b1": flops(ucfg) / 1e9}
    if args.dump:
        res["params_model"] = _mlx_dump(ucfg, Path(args.dump) / f"{name}.npz")
        return res
    rows: dict[str, Any] = {}
    res["rows"] = rows
    if args.partial:  # what a stopped run needs besides its measurements
        with open(args.partial, "a") as f:
            f.write(json.dumps({"config": name, "info": dict(res)}) + "\n")
    peak = (mx.reset_peak_memory, lambda: round(mx.get_peak_memory() / 2**20, 1))
    _mlx_sampling(args, name, ucfg, rows, peak)
    for batch in args.batch:
        shape = (batch, ucfg.image_size, ucfg.image_size, ucfg.channels)
        x0 = mx.array(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
        for kind in args.mlx_variants:
            if _skipped(args.skip, name, f"train_{kind}") \
                    or _skipped(args.skip, name, f"train_b{batch}_{kind}"):
                continue
            dtype = "bfloat16" if kind.endswith("bf16") else "float32"
            cfg = Config(unet=ucfg, schedule=ScheduleConfig(sampler="ddim", steps=args.sample_steps),
                         train=TrainConfig(batch_size=batch, steps=10**6, dtype=dtype))

            def build(cfg: Any = cfg, kind: str = kind, x0: Any = x0) -> tuple[Callable, float]:
                start = time.perf_counter()
                state = etrain.init_state(cfg)
                res["params_model"] = state.model.num_params()
                # The engine's own training step (loss, grad clip, AdamW; EMA not included).
                step = etrain.training_update(state) if kind.startswith("compiled") \
                    else _mlx_eager_step(state)
                keys = iter(range(1, 1 << 30))

                def one() -> None:
                    loss = step(x0, mx.random.key(next(keys)))
                    mx.eval(loss, state.model.state, state.optimizer.state)

                return one, time.perf_counter() - start

            _log(f"[mlx] {name}: train b{batch} {kind}")
            _measure(args, "mlx", name, f"train_b{batch}", kind, rows, build, mx.synchronize,
                     peak, batch, "images_per_s")
    return res


def _mlx_sampling(args: argparse.Namespace, name: str, ucfg: Any, rows: dict[str, Any],
                  peak: tuple[Callable, Callable]) -> None:
    """DDIM rows first: they are cheap, and a train step's compilation may run past a limit."""
    import mlx.core as mx

    from engine.config import ScheduleConfig
    from engine.model.unet import UNet
    from engine.sampling.samplers import generate

    model = UNet(ucfg)
    mx.eval(model.parameters())
    sched = ScheduleConfig(sampler="ddim", steps=args.sample_steps)
    for n in args.sample_batches:
        if _skipped(args.skip, name, f"sample_b{n}"):
            continue
        _log(f"[mlx] {name}: sample ddim{args.sample_steps} b{n}")
        # engine.sampling.samplers.generate ends with mx.eval: each call is one synchronised run.
        _measure(args, "mlx", name, f"sample_b{n}", "engine", rows,
                 lambda n=n: ((lambda: generate(model, sched, n, 0, ucfg.image_size,
                                                ucfg.channels)), 0.0),
                 mx.synchronize, peak, 1.0, "ms")


# --------------------------------------------------------------------------- torch worker

def _torch_setup(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    want = args.torch_device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    return torch, torch.device("cuda" if use_cuda else "cpu")


def torch_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    torch, dev = _torch_setup(args)
    fp = {"torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
          "interop_threads": torch.get_num_interop_threads(), "cpu": _cpu_name(),
          "cores": os.cpu_count(), "python": platform.python_version(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "mkl": torch.backends.mkl.is_available(),
          "mkldnn": torch.backends.mkldnn.is_available()}
    if dev.type == "cuda":
        fp["gpu"] = torch.cuda.get_device_name(dev)
        fp["cuda"] = torch.version.cuda
        fp["cudnn"] = torch.backends.cudnn.version()
        fp["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        fp["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return fp


def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch, dev = _torch_setup(args)
    sys.path[:0] = [str(HERE), str(HERE / "gpu")]
    import torch_unet as tu

    results = {"framework": "torch", "device": torch_fingerprint(args), "configs": {}}
    expect = json.loads(args.expect_params) if args.expect_params else {}
    for name, data in _load_configs(args.config).items():
        cfg = tu.UNetCfg.from_dict(data)
        res: dict[str, Any] = {"params_model": tu.param_count(cfg)}
        if name in expect and res["params_model"] != expect[name]:
            raise SystemExit(f"{name}: the torch port has {res['params_model']} parameters, "
                             f"engine.model.cost.param_count says {expect[name]}")
        if args.check:
            res.update(_torch_check(torch, tu, cfg, Path(args.check) / f"{name}.npz", dev))
        else:
            _log(f"[torch] {name} on {dev}, {torch.get_num_threads()} threads")
            res.update(_torch_config(args, torch, tu, cfg, name, dev))
        results["configs"][name] = res
    return results


def _skip(args: argparse.Namespace, rows: dict[str, Any], name: str, row: str, vname: str,
          why: str) -> None:
    """A torch variant this device cannot run: in the table and the partial file, with why."""
    rows.setdefault(row, {})[vname] = {"skipped": why}
    _record(args, "torch", name, row, vname, {"skipped": why})


def _torch_config(args: argparse.Namespace, torch: Any, tu: Any, cfg: Any, name: str,
                  dev: Any) -> dict[str, Any]:
    """Every ``--torch-variants`` entry (benchmarks/gpu/torch_variants.py) on every row."""
    import torch_variants as tv

    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    peak = ((lambda: torch.cuda.reset_peak_memory_stats(dev)),
            (lambda: round(torch.cuda.max_memory_allocated(dev) / 2**20, 1))) if cuda \
        else ((lambda: None), (lambda: None))
    rows: dict[str, Any] = {}
    h = cfg.image_size
    grid = ddim_grid(args.sample_steps)
    for vname in args.torch_variants:
        v = tv.parse(vname)
        why = tv.unavailable(v, dev)
        for batch in args.batch:
            row = f"train_b{batch}"
            if _skipped(args.skip, name, f"train_{vname}") \
                    or _skipped(args.skip, name, f"train_b{batch}_{vname}"):
                continue
            if why:
                _skip(args, rows, name, row, vname, why)
                continue
            torch.manual_seed(0)
            x0 = torch.from_numpy(np.random.default_rng(0).uniform(
                -1, 1, (batch, h, h, cfg.channels)).astype(np.float32)).permute(0, 3, 1, 2)
            x0 = x0.contiguous().to(dev)
            _log(f"[torch] {name}: train b{batch} {vname}")
            _measure(args, "torch", name, row, vname, rows,
                     lambda v=v, x0=x0: tv.train_step(torch, tu, cfg, v, dev, x0, LR, GRAD_CLIP,
                                                      T_MIN, ALPHA_BAR_MIN),
                     sync, peak, batch, "images_per_s")
        for n in args.sample_batches:
            row = f"sample_b{n}"
            if _skipped(args.skip, name, row) or _skipped(args.skip, name, f"{row}_{vname}"):
                continue
            if why:
                _skip(args, rows, name, row, vname, why)
                continue
            torch.manual_seed(0)
            _log(f"[torch] {name}: sample ddim{args.sample_steps} b{n} {vname}")
            _measure(args, "torch", name, row, vname, rows,
                     lambda v=v, n=n: tv.sampler(torch, tu, cfg, v, dev, n, grid,
                                                 args.sample_steps),
                     sync, peak, 1.0, "ms")
    return {"rows": rows}


def _torch_check(torch: Any, tu: Any, cfg: Any, path: Path, dev: Any) -> dict[str, Any]:
    """Load the MLX weights into the torch port, run the same input, compare outputs."""
    data = np.load(path)
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    model = tu.UNet(cfg)
    tu.load_mlx_weights(model, weights)
    model = model.to(dev).eval()
    if dev.type == "cuda":  # compare in true fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().to(dev)
    with torch.inference_mode():
        y = model(x, torch.from_numpy(data["t"]).to(dev)).permute(0, 2, 3, 1).cpu().numpy()
    ref = data["y"]
    err = float(np.abs(y - ref).max())
    return {"params_cost": int(data["params_cost"]), "params_mlx": int(data["params_model"]),
            "max_abs_err": err, "max_rel_err": err / float(np.abs(ref).max()),
            "n_tensors": len(weights)}


# --------------------------------------------------------------------------------- driver

def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
         cores: set[int] | None = None) -> dict[str, Any] | None:
    """Run one worker and return its result; ``None`` when it ran past ``timeout`` (then it
    and its children are killed: torch.compile starts compile workers). ``cores``: the
    worker and every thread and process it starts run on those cores only."""
    _log("$ " + " ".join(shlex.quote(c) for c in cmd)
         + (f"   [env {' '.join(f'{k}={v}' for k, v in (env or {}).items())}]" if env else "")
         + (f"   [cores {','.join(map(str, sorted(cores)))}]" if cores else ""))
    full_env = dict(os.environ)
    full_env.update(env or {})
    mine = os.sched_getaffinity(0) if cores else None
    if cores:  # the child inherits this thread's cores at its start; this thread gets its own back
        os.sched_setaffinity(0, cores)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    finally:
        if mine:
            os.sched_setaffinity(0, mine)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        _log(f"worker ran past {timeout:.0f} s and was stopped: {' '.join(cmd[:4])} ...")
        return None
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{stdout}")
    for line in stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise SystemExit(f"no result from {' '.join(cmd)}:\n{stdout}")


def _salvage(path: Path, framework: str, device: dict[str, Any]) -> dict[str, Any]:
    """A stopped worker's result, rebuilt from the measurements it appended to ``path``."""
    res: dict[str, Any] = {"framework": framework, "device": device, "configs": {},
                           "timed_out": True}
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        rec = json.loads(line)
        conf = res["configs"].setdefault(rec["config"], {"rows": {}})
        if "info" in rec:
            conf.update(rec["info"])
            continue
        stat = {k: v for k, v in rec.items() if k not in ("framework", "config", "row",
                                                           "variant")}
        conf["rows"].setdefault(rec["row"], {})[rec["variant"]] = stat
    return res


def _partial_for(args: argparse.Namespace, label: str) -> Path:
    base = Path(args.partial) if args.partial else Path(tempfile.gettempdir()) / \
        f"throughput-{os.getpid()}.jsonl"
    path = base.with_name(f"{base.stem}.{label.replace(' ', '-')}.jsonl")
    path.unlink(missing_ok=True)
    return path


def _default_mlx_python() -> str:
    if shutil.which("uv") and (ROOT / "pyproject.toml").exists():
        return "uv run python"
    return sys.executable


def _default_torch_python() -> str:
    return "/tmp/torchenv/bin/python" if Path("/tmp/torchenv/bin/python").exists() else "python3"


def _worker_cmd(python: str, framework: str, args: argparse.Namespace,
                extra: list[str]) -> list[str]:
    cmd = shlex.split(python) + [str(HERE / "throughput.py"), "--framework", framework]
    for c in args.config:
        cmd += ["--config", c]
    cmd += ["--batch", *map(str, args.batch), "--sample-steps", str(args.sample_steps),
            "--windows", str(args.windows), "--train-warmup", str(args.train_warmup),
            "--min-window-s", str(args.min_window_s), "--sample-batches",
            *map(str, args.sample_batches), "--mlx-device", args.mlx_device,
            "--torch-device", args.torch_device, "--clock", args.clock,
            "--mlx-variants", ",".join(args.mlx_variants),
            "--torch-variants", ",".join(args.torch_variants)]
    for entry in args.skip:
        cmd += ["--skip", entry]
    return cmd + extra


def _thread_env(threads: int) -> dict[str, str]:
    t = str(threads)
    return {"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}


def _cores(threads: int) -> set[int] | None:
    """The first ``threads`` cores this process may use, for an n-thread CPU run: the
    thread count alone does not bound a framework's cores (MLX encodes the graph on the
    caller's thread and computes on a thread of its own, so "1 thread" ran on two cores).
    ``None`` where the OS cannot confine a process (macOS)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return set(sorted(os.sched_getaffinity(0))[:threads])


def device_report(args: argparse.Namespace) -> dict[str, Any]:
    mlx_py, torch_py = args.mlx_python or _default_mlx_python(), \
        args.torch_python or _default_torch_python()
    rep = {}
    for blas in args.mlx_blas:
        env = {"DIFFNAS_BLAS": "reference"} if blas == "reference" else {}
        rep[f"mlx[{blas}]"] = _run(shlex.split(mlx_py) + [
            str(HERE / "throughput.py"), "--framework", "mlx", "--device-report",
            "--mlx-device", args.mlx_device], env)
    for t in args.threads:
        rep[f"torch[{t}T]"] = _run(shlex.split(torch_py) + [
            str(HERE / "throughput.py"), "--framework", "torch", "--device-report",
            "--threads", str(t), "--torch-device", args.torch_device], _thread_env(t))
    return rep


def compare(args: argparse.Namespace) -> dict[str, Any]:
    mlx_py = args.mlx_python or _default_mlx_python()
    torch_py = args.torch_python or _default_torch_python()
    t0 = time.perf_counter()
    report = device_report(args)
    mlx_gpu = any(v.get("backend") in ("cuda", "metal") for k, v in report.items()
                  if k.startswith("mlx"))
    torch_gpu = any(v.get("device", "").startswith("cuda") for k, v in report.items()
                    if k.startswith("torch"))
    out: dict[str, Any] = {"device_report": report, "runs": {}, "equivalence": {}}

    # 1. Equivalence: same weights, same input, same output; parameter counts equal.
    if not args.skip_equivalence:
        names = list(args.config) + list(CHECK_ONLY)
        with tempfile.TemporaryDirectory() as tmp:
            eq_args = argparse.Namespace(**{**vars(args), "config": names})
            mlx_res = _run(_worker_cmd(mlx_py, "mlx", eq_args, ["--dump", tmp]))
            expect = {n: r["params_cost"] for n, r in mlx_res["configs"].items()}
            torch_res = _run(_worker_cmd(torch_py, "torch", eq_args, [
                "--check", tmp, "--threads", str(args.threads[0]),
                "--expect-params", json.dumps(expect)]), _thread_env(args.threads[0]))
        tol = 1e-4 if not (mlx_gpu or torch_gpu) else 1e-2
        for n in names:
            m, t = mlx_res["configs"][n], torch_res["configs"][n]
            ok = (m["params_cost"] == m["params_model"] == t["params_model"]
                  and t["max_rel_err"] < tol)
            out["equivalence"][n] = {"params_engine_cost": m["params_cost"],
                                     "params_mlx": m["params_model"],
                                     "params_torch": t["params_model"],
                                     "max_abs_err": t["max_abs_err"],
                                     "max_rel_err": t["max_rel_err"], "tol": tol, "ok": ok}
        bad = [n for n, e in out["equivalence"].items() if not e["ok"]]
        if bad:
            raise SystemExit(f"MLX and torch models differ: {bad}: "
                             f"{json.dumps(out['equivalence'], indent=1)}")

    # 2. Expected parameter counts from engine.model.cost, for the torch worker to assert.
    expect = {}
    # 3. Timings. MLX: one run per BLAS x thread count (on GPU: one run); torch: per thread.
    mlx_variants = []
    if mlx_gpu:
        mlx_variants.append(("mlx gpu", {}))
    else:
        for blas in args.mlx_blas:
            if blas == "reference":  # netlib reference BLAS is single-threaded
                mlx_variants.append(("mlx ref 1T", {"DIFFNAS_BLAS": "reference",
                                                    **_thread_env(1)}))
            else:
                for t in args.threads:
                    mlx_variants.append((f"mlx openblas {t}T", _thread_env(t)))
    mlx_fp = next(v for k, v in report.items() if k.startswith("mlx"))
    for label, env in mlx_variants:
        extra = [a for e in args.ref_skip for a in ("--skip", e)] if "ref" in label else []
        part = _partial_for(args, label)
        cores = None if mlx_gpu else _cores(int(env.get("OPENBLAS_NUM_THREADS", "1")))
        res = _run(_worker_cmd(mlx_py, "mlx", args, extra + ["--partial", str(part)]), env,
                   args.mlx_timeout, cores) or _salvage(part, "mlx", mlx_fp)
        res["cores"] = sorted(cores) if cores else None
        out["runs"][label] = res
        expect = {n: r["params_cost"] for n, r in res["configs"].items() if "params_cost" in r}
    torch_threads = args.threads[:1] if torch_gpu else args.threads
    for t in torch_threads:
        label = "torch cuda" if torch_gpu else f"torch {t}T"
        part = _partial_for(args, label)
        cores = None if torch_gpu else _cores(t)
        out["runs"][label] = _run(_worker_cmd(torch_py, "torch", args, [
            "--threads", str(t), "--expect-params", json.dumps(expect), "--partial", str(part)]),
            _thread_env(t), args.torch_timeout, cores) \
            or _salvage(part, "torch", report.get(f"torch[{t}T]", {}))
        out["runs"][label]["cores"] = sorted(cores) if cores else None
    out["wall_s"] = time.perf_counter() - t0
    return out


def markdown(out: dict[str, Any], args: argparse.Namespace) -> str:
    sys.path.insert(0, str(HERE / "gpu"))
    import best

    lines = best.tables(out, args.config, args.sample_steps, args.peak_tflops or [])
    if out.get("equivalence"):
        lines.append("\n| equivalence check | params engine.model.cost | MLX | torch | "
                     "max abs err | max rel err | ok |")
        lines.append("|---|---|---|---|---|---|---|")
        for n, e in out["equivalence"].items():
            lines.append(f"| {n} | {e['params_engine_cost']} | {e['params_mlx']} | "
                         f"{e['params_torch']} | {e['max_abs_err']:.2e} | "
                         f"{e['max_rel_err']:.2e} | {'yes' if e['ok'] else 'NO'} |")
    lines.append("\nDevice report:\n")
    for k, v in out["device_report"].items():
        lines.append(f"- `{k}`: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()))
    return "\n".join(lines)


def _check_variants(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Split and validate ``--mlx-variants`` / ``--torch-variants``; a bad name is one line."""
    sys.path.insert(0, str(HERE / "gpu"))
    import torch_variants as tv

    args.mlx_variants = [v.strip() for v in args.mlx_variants.split(",") if v.strip()]
    if args.no_eager:
        args.mlx_variants = [v for v in args.mlx_variants if v != "eager"]
    bad = [v for v in args.mlx_variants if v not in MLX_VARIANTS]
    if bad:
        p.error(f"--mlx-variants: unknown {bad[0]!r}; use {', '.join(MLX_VARIANTS)}")
    args.torch_variants = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
    for v in args.torch_variants:
        try:
            tv.parse(v)
        except ValueError as exc:
            p.error(f"--torch-variants: {exc}")
    if args.peak_tflops and (len(args.peak_tflops) > 2 or min(args.peak_tflops) <= 0):
        p.error(f"--peak-tflops {args.peak_tflops}: give one or two positive numbers "
                "(fp32 [bf16])")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--framework", choices=("mlx", "torch"), help="run one worker")
    mode.add_argument("--compare", action="store_true", help="run both, print a table")
    p.add_argument("--device-report", action="store_true",
                   help="print device fingerprints (with --framework: that side only)")
    p.add_argument("--config", action="append", default=None,
                   help=f"built-in ({', '.join(CONFIGS)}) or a .json file; repeatable")
    p.add_argument("--batch", type=int, nargs="+", default=[32], help="training batch sizes")
    p.add_argument("--sample-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--windows", type=int, default=5, help="timed windows (>= 5)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed train steps")
    p.add_argument("--min-window-s", type=float, default=0.5,
                   help="a training window lasts at least this long")
    p.add_argument("--no-eager", action="store_true",
                   help="MLX: skip the uncompiled step (drops 'eager' from --mlx-variants)")
    p.add_argument("--mlx-variants", default="compiled,eager",
                   help=f"MLX train steps, comma-separated: {', '.join(MLX_VARIANTS)}")
    p.add_argument("--torch-variants", default="eager",
                   help="torch variants, comma-separated; each a base (eager, fused, compile, "
                        "compile-ro, cudagraph) with optional +bf16, +channels_last, e.g. "
                        "'eager,compile,cudagraph+bf16' (see benchmarks/gpu/torch_variants.py)")
    p.add_argument("--peak-tflops", type=float, nargs="+", default=None,
                   help="peak TFLOP/s for the FLOP/s share: fp32 [bf16], e.g. 50.6 781")
    p.add_argument("--partial", help="append every measurement to this JSON-lines file as it "
                   "is made (driver default with --json-out: <json-out>.partial.jsonl)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time, or the worker's CPU time (all its threads): on a "
                        "shared, loaded machine the CPU time of a 1-thread run stays "
                        "close to its idle wall time; meaningless at 2 threads")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch threads / OPENBLAS_NUM_THREADS (default: 1 2; worker: 1)")
    p.add_argument("--mlx-blas", nargs="+", default=["openblas", "reference"],
                   choices=("openblas", "reference"), help="MLX CPU BLAS variants")
    p.add_argument("--mlx-device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--mlx-python", help="interpreter for the MLX side (default: 'uv run "
                   "python' if uv exists, else this python)")
    p.add_argument("--torch-python", help="interpreter for the torch side (default: "
                   "/tmp/torchenv/bin/python if it exists, else python3)")
    p.add_argument("--skip", action="append", default=[],
                   help="skip a measurement: METRIC or CONFIG:METRIC, e.g. demo:sample_b16 "
                        "(metrics: train_compiled, train_eager, sample_bN); repeatable")
    p.add_argument("--ref-skip", action="append", default=[],
                   help="like --skip, for the MLX reference-BLAS run only (it is slow)")
    p.add_argument("--skip-equivalence", action="store_true")
    p.add_argument("--mlx-timeout", type=float, default=None,
                   help="driver: stop an MLX worker after this many seconds and keep what it "
                        "measured (read back from its --partial file)")
    p.add_argument("--torch-timeout", type=float, default=None, help="the same for torch")
    p.add_argument("--json-out", help="driver: write all raw results here")
    p.add_argument("--md-out", help="driver: write the markdown table here")
    # worker-internal
    p.add_argument("--dump", help=argparse.SUPPRESS)
    p.add_argument("--check", help=argparse.SUPPRESS)
    p.add_argument("--expect-params", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config = args.config or list(CONFIGS)
    _check_variants(p, args)
    global clock
    clock = CLOCKS[args.clock]
    if args.framework:
        args.threads = (args.threads or [1])[0]
        if args.device_report:
            fp = mlx_fingerprint(args.mlx_device) if args.framework == "mlx" \
                else torch_fingerprint(args)
            print(MARK + json.dumps(fp))
            return
        res = mlx_worker(args) if args.framework == "mlx" else torch_worker(args)
        print(MARK + json.dumps(res))
        return
    args.threads = args.threads or [1, 2]
    if args.device_report and not args.compare:
        print(json.dumps(device_report(args), indent=2))
        return
    if not args.compare:
        p.error("choose --framework, --compare or --device-report")
    if args.json_out and not args.partial:
        args.partial = str(Path(args.json_out).with_suffix(".partial.jsonl"))
    out = compare(args)
    md = markdown(out, args)
    print(md)
    print(f"\n(total wall time {out['wall_s']:.0f} s)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    if args.md_out:
        Path(args.md_out).write_text(md + "\n")


if __name__ == "__main__":
    main()
