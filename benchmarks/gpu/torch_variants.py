"""PyTorch at its best, for ``benchmarks/throughput.py``'s torch worker: one variant each.

A variant is a base mode and optional flags joined by ``+`` (``cudagraph+bf16``,
``compile-ro+channels_last``):

- ``eager``: the harness's original baseline (plain ``AdamW``, torch's cuDNN defaults);
- ``fused``: eager with ``AdamW(fused=True)`` and ``cudnn.benchmark = True``;
- ``compile`` / ``compile-ro``: ``torch.compile(model)`` (default mode / ``mode=
  "reduce-overhead"``, which replays CUDA graphs); loss, clip and the fused AdamW stay eager;
- ``cudagraph``: the whole train step (noise draw, forward, loss, backward, clip, fused
  capturable AdamW) captured once as one CUDA graph after warm-up on a side stream, then
  replayed; for sampling, the whole DDIM loop is one graph. CUDA only.

Flags: ``bf16`` (``torch.autocast`` to bfloat16; weights, gradients and optimizer state
stay float32) and ``channels_last`` (model and input in NHWC memory format). Every variant
but plain ``eager`` uses the fused AdamW and ``cudnn.benchmark``.

This module never imports ``engine`` or ``mlx`` (the torch worker runs without them), and
imports torch only inside functions, so the driver can parse variant names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASES = ("eager", "fused", "compile", "compile-ro", "cudagraph")
FLAGS = ("bf16", "channels_last")


@dataclass(frozen=True)
class Variant:
    name: str
    base: str
    bf16: bool
    channels_last: bool

    @property
    def tuned(self) -> bool:
        """Fused AdamW and cudnn.benchmark: every variant but the plain eager baseline."""
        return self.name != "eager"


def parse(name: str) -> Variant:
    """``base[+flag...]`` -> Variant; a bad name raises ValueError naming the culprit."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    bases = [p for p in parts if p in BASES]
    flags = [p for p in parts if p in FLAGS]
    bad = [p for p in parts if p not in BASES and p not in FLAGS]
    if bad or len(bases) > 1 or not parts:
        culprit = bad[0] if bad else name
        raise ValueError(f"torch variant {culprit!r} in {name!r}: use one of {', '.join(BASES)}"
                         f" plus optional {', '.join(FLAGS)}, joined by '+'")
    base = bases[0] if bases else "fused"
    return Variant(name, base, "bf16" in flags, "channels_last" in flags)


def unavailable(v: Variant, dev: Any) -> str | None:
    """Why ``v`` cannot run on ``dev`` (one line), or None."""
    if v.base == "cudagraph" and dev.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def _autocast(torch: Any, v: Variant, dev: Any, cache: bool = True) -> Any:
    import contextlib

    if not v.bf16:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=cache)


def _model(torch: Any, tu: Any, cfg: Any, v: Variant, dev: Any) -> tuple[Any, Any]:
    """The module to train (weights) and the callable to run (compiled or not)."""
    model = tu.UNet(cfg).to(dev)
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = model
    if v.base.startswith("compile"):
        # A fresh start per variant: a new model instance fails the guards of the last
        # one, and past torch._dynamo's recompile limit a frame silently runs eager.
        torch._dynamo.reset()
    if v.base == "compile":
        run = torch.compile(model)
    elif v.base == "compile-ro":
        run = torch.compile(model, mode="reduce-overhead")
    return model, run


def _input(torch: Any, x: Any, v: Variant) -> Any:
    return x.contiguous(memory_format=torch.channels_last) if v.channels_last else x


def train_step(torch: Any, tu: Any, cfg: Any, v: Variant, dev: Any, x0: Any, lr: float,
               grad_clip: float, t_min: float, ab_min: float) -> tuple[Callable[[], None], float]:
    """A no-argument train step for variant ``v`` and the seconds its preparation took
    (compiling happens on the first call and is timed by the caller; a CUDA graph is
    warmed up and captured here)."""
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = v.tuned and dev.type == "cuda"
    model, run = _model(torch, tu, cfg, v, dev)
    model.train()
    x0 = _input(torch, x0, v)
    kw: dict[str, Any] = {}
    if v.tuned:
        kw["fused"] = True
        if v.base == "cudagraph":
            kw["capturable"] = True
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, **kw)
    s_ = 0.008
    norm = math.cos(s_ / (1 + s_) * math.pi / 2) ** 2
    batch = x0.shape[0]
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) \
        if v.base == "compile-ro" else None

    def body(capturing: bool = False) -> None:
        # engine.sampling.diffusion.diffusion_loss (eps, cosine) + clip + AdamW
        if mark is not None:
            mark()
        t = torch.rand(batch, device=dev) * (1.0 - t_min) + t_min
        eps = torch.randn_like(x0)
        ab = (torch.cos((t + s_) / (1 + s_) * math.pi / 2) ** 2 / norm).clamp(ab_min, 1)
        a, s = ab.sqrt()[:, None, None, None], (1.0 - ab).sqrt()[:, None, None, None]
        with _autocast(torch, v, dev, cache=not capturing):
            out = run(a * x0 + s * eps, t)
        loss = ((out.float() - eps) ** 2).mean()
        if not capturing:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()

    if v.base != "cudagraph":
        return body, time.perf_counter() - start
    graph = _capture(torch, lambda: body(), lambda: (opt.zero_grad(set_to_none=True),
                                                      body(capturing=True)))
    return graph.replay, time.perf_counter() - start


def _capture(torch: Any, warm: Callable[[], Any], record: Callable[[], Any]) -> Any:
    """Warm up on a side stream (cuDNN autotuning, allocator), then capture ``record``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warm()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record()
    torch.cuda.synchronize()
    return graph


def sampler(torch: Any, tu: Any, cfg: Any, v: Variant, dev: Any, n: int, grid: tuple,
            steps: int) -> tuple[Callable[[], Any], float]:
    """A no-argument DDIM-``steps`` run at batch ``n`` (engine.sampling.samplers.sample_ddim,
    eta 0, x0 clipped) for variant ``v``, and its preparation seconds."""
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = v.tuned and dev.type == "cuda"
    model, run = _model(torch, tu, cfg, v, dev)
    model.eval()
    ts, alphas, sigmas = grid
    h = cfg.image_size
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) \
        if v.base == "compile-ro" else None

    @torch.inference_mode()
    def loop(capturing: bool = False) -> Any:
        if mark is not None:
            mark()
        x = _input(torch, torch.randn(n, cfg.channels, h, h, device=dev), v)
        for i in range(steps):
            a_t, s_t = float(alphas[i]), float(sigmas[i])
            a_s, s_s = float(alphas[i + 1]), float(sigmas[i + 1])
            with _autocast(torch, v, dev, cache=not capturing):
                out = run(x, torch.full((n,), float(ts[i]), device=dev)).float()
            x0_hat = ((x - s_t * out) / a_t).clamp(-1.0, 1.0)
            eps = (x - a_t * x0_hat) / s_t
            x = a_s * x0_hat + s_s * eps
        return x

    if v.base != "cudagraph":
        return loop, time.perf_counter() - start
    graph = _capture(torch, loop, lambda: loop(capturing=True))
    return graph.replay, time.perf_counter() - start
