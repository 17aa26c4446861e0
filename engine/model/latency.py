"""Per-device latency prediction from a table of measured block latencies.

In the spirit of nn-Meter (Zhang et al. 2021): a U-Net's sampling latency is the sum
of the latencies of its blocks, each measured once on the device and kept in a table::

    raw     = sampler + steps * sum(block latencies of one forward pass)
    latency = scale * raw + per_block_ms * steps * blocks

``sampler`` is the same sampling call with a network that costs nothing (noise, grid
and the sampler's element-wise updates: the per-call overhead). A block is the time
MLP, ``conv_in``, a ResBlock (with the decoder's skip concatenation), an attention
layer, a down- or upsample, or the output head, keyed by every setting that changes
its cost. ``scale`` and ``per_block_ms`` absorb what a block pays inside one lazy
sampling graph but not alone (framework overhead per op, colder caches); they are
fitted per device from a few measured sampling calls (:func:`calibrate`).

Entries are measured lazily, the first time a config needs them, running K copies of
the block per ``mx.eval`` (warm-up, then the lower quartile of 7 timings, in 3 rounds
over all missing blocks, keeping the fastest: a burst of other work on a shared machine
only ever slows a timing down). A table belongs to one device: it is cached as JSON under
``results/latency-tables/``, named by a hash of :func:`engine.device.bench.device_fingerprint`.
A machine that is not the device (the coordinator) loads it with ``measure=False`` and
estimates any missing block from the measured blocks of its kind by FLOPs. How an entry is
timed (its probe, K copies, the clock) is :mod:`engine.model.latency_timing`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.config import Config, UNetConfig
from engine.device.bench import device_fingerprint
from engine.model.blocks import Block, walk
from engine.model.cost import block_layers
from engine.model.latency_timing import (  # noqa: F401  (sampling_latency, time_ms: the API)
    Probe,
    block_probe,
    measure_ms,
    sampler_probe,
    sampling_latency,
    time_ms,
)
from engine.model.unet import UNet

TABLE_DIR = Path("results") / "latency-tables"
FORMAT = 1
MIN_POINTS_2D = 8  # calibration points before per_block_ms is fitted too
ROUNDS = 3  # a missing entry is timed once per round and keeps its fastest


TIMING = 2
"""How entries are timed, hashed into a table's name: a table cached before a change in how
the engine times (2: sampling on one core as a ``SCHED_BATCH`` thread,
:func:`engine.device.contention.batch_scheduled`) is measured afresh, not mixed with it."""


def device_key(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of a device fingerprint and :data:`TIMING`: the table's file name."""
    text = json.dumps({"device": fingerprint, "timing": TIMING}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_clock() -> str:
    """``cpu`` (process CPU time) on MLX's CPU backend, else ``wall``.

    On the CPU backend one thread computes (ops run on one thread, BLAS is pinned to one),
    so the process's CPU time equals the wall time on an idle machine and stays so while
    other processes share the cores, when wall time swings by 2-3x. GPU work does not
    show up in CPU time, so Metal and CUDA use wall time.
    """
    return "cpu" if mx.default_device().type == mx.cpu else "wall"


@dataclass
class LatencyTable:
    """Measured latency (ms) per block key for one device, and its calibration points.

    Args:
        fingerprint: the device the entries were measured on.
        entries: block key -> ``{"ms": latency, "flops": FLOPs}``.
        points: calibration points ``(raw_ms, steps * blocks, measured_ms)``.
        path: where :meth:`save` writes (None: not cached).
        measure: measure unknown blocks on demand (a worker on the device); False where
            the table is only read (the coordinator): missing blocks are estimated.
        clock: ``wall`` or ``cpu`` (:func:`default_clock`).
    """

    fingerprint: dict[str, Any]
    entries: dict[str, dict[str, float]] = field(default_factory=dict)
    points: list[tuple[float, float, float]] = field(default_factory=list)
    path: Path | None = None
    measure: bool = True
    clock: str = field(default_factory=default_clock)
    measured: int = 0  # entries measured by this process
    estimated: int = 0  # lookups answered by the FLOP estimate

    @classmethod
    def load(cls, cache_dir: str | Path = TABLE_DIR, fingerprint: dict[str, Any] | None = None,
             measure: bool = True, clock: str | None = None) -> LatencyTable:
        """The cached table of ``fingerprint`` (default: this device), or a new empty one.

        Raises:
            ValueError: the cached file is corrupt or was measured on another clock.
        """
        fingerprint = device_fingerprint() if fingerprint is None else fingerprint
        path = Path(cache_dir) / f"{device_key(fingerprint)}.json"
        table = cls(fingerprint, path=path, measure=measure, clock=clock or default_clock())
        if path.exists():
            cached = _read(path)
            if cached.clock != table.clock:
                raise ValueError(f"{path}: measured on the {cached.clock} clock, "
                                 f"not {table.clock}")
            table.entries, table.points = cached.entries, cached.points
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "clock": self.clock,
                "device_key": device_key(self.fingerprint), "entries": self.entries,
                "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], measure: bool = False) -> LatencyTable:
        """Rebuild a table (for example one that a worker sent to the coordinator)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"latency table: expected format {FORMAT}")
        entries = {k: {"ms": float(v["ms"]), "flops": float(v["flops"])}
                   for k, v in data["entries"].items()}
        points = [(float(a), float(b), float(c)) for a, b, c in data.get("points", [])]
        return cls(dict(data["fingerprint"]), entries, points, measure=measure,
                   clock=str(data["clock"]))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache file's lock: processes of one device (the workers of one machine,
        their trials) then measure and save one at a time, and none loses another's entries.
        """
        assert self.path is not None, "table has no cache path"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    self.merge(_read(self.path))
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def merge(self, other: LatencyTable) -> None:
        """Add ``other``'s entries and calibration points (this table's entries win)."""
        self.entries = {**other.entries, **self.entries}
        self.points = list(dict.fromkeys(other.points + self.points))

    def save(self) -> Path:
        """Merge with the cached file (another process may have added to it) and write."""
        assert self.path is not None, "table has no cache path"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            try:
                self.merge(_read(self.path))
            except ValueError:
                pass  # a corrupt cache is replaced
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        return self.path

    def lookup(self, key: str, flops: float) -> float:
        """The entry for ``key``, or its FLOP estimate when the table lacks it."""
        if key in self.entries:
            return self.entries[key]["ms"]
        self.estimated += 1
        return _estimate(self.entries, key, flops)

    def fill(self, needs: list[Need], rounds: int = ROUNDS) -> None:
        """Measure the needed entries the table lacks (if it measures), in ``rounds``.

        Each round times every missing block once; an entry keeps its fastest round. The
        rounds are spread over the whole measurement, so a burst of other work on a shared
        machine would have to outlast all of them to move an entry.
        """
        todo = {n.key: n for n in needs if n.key not in self.entries}
        if not todo or not self.measure:
            return
        probes = {key: n.probe() for key, n in todo.items()}
        best = dict.fromkeys(todo, math.inf)
        for _ in range(rounds):
            for key, probe in probes.items():
                best[key] = min(best[key], measure_ms(probe, self.clock))
        for key, n in todo.items():
            self.entries[key] = {"ms": best[key], "flops": n.flops}
        self.measured += len(todo)

    def fit(self) -> tuple[float, float]:
        """``(scale, per_block_ms)`` from the calibration points (relative least squares).

        With fewer than ``MIN_POINTS_2D`` points only ``scale`` is fitted (the median ratio
        of measured to raw), which a handful of noisy points cannot overfit.
        """
        if not self.points:
            return 1.0, 0.0
        raw, calls, actual = (np.array(c) for c in zip(*self.points))
        if len(self.points) >= MIN_POINTS_2D:
            x = np.stack([raw, calls], axis=1) / actual[:, None]
            (scale, per_block), *_ = np.linalg.lstsq(x, np.ones(len(raw)), rcond=None)
            if scale > 0 and per_block >= 0:
                return float(scale), float(per_block)
        return float(np.median(actual / raw)), 0.0


def _read(path: Path) -> LatencyTable:
    try:
        return LatencyTable.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: corrupt latency table ({err})") from None


# --------------------------------------------------------------------------- block keys


def block_key(cfg: UNetConfig, block: Block, batch: int) -> str:
    """Every setting that changes the cost of ``block``, as one string."""
    groups = cfg.norm_groups if cfg.norm == "group" else 1
    act, r, out = f"act={cfg.activation}", f"r={block.res}", f"out={block.cout}"
    ins = "in=" + "+".join(str(part.width) for part in block.ins)
    parts = {
        "time": [f"d={cfg.base_width}", f"e={cfg.time_emb_dim}", act],
        "conv_in": [r, ins, out],
        "res": [r, ins, out, act, f"g={groups}", f"sep={cfg.separable:d}",
                f"e={cfg.time_emb_dim}", f"drop={cfg.dropout > 0:d}"],
        "attn": [r, out, f"heads={block.cout // cfg.head_dim}", f"g={groups}"],
        "down": [r, out],
        "up": [r, out, cfg.resample],
        "out": [r, ins, out, act, f"g={groups}"],
    }[block.kind]
    return "|".join([block.kind, *parts, f"b={batch}"])


def sampler_key(config: Config, batch: int) -> str:
    s, u = config.schedule, config.unet
    tol = f"|tol={s.tolerance:g}" if s.sampler == "adaptive" else ""
    return (f"sampler|{s.sampler}|steps={s.steps}|{s.prediction}|{s.beta_schedule}|"
            f"{s.spacing}|eta={s.eta:g}{tol}|r={u.image_size}|c={u.channels}|b={batch}")


def block_flops(cfg: UNetConfig, block: Block, batch: int) -> float:
    """FLOPs of one block (a multiply-add is 2): the feature of the fallback estimate.

    A ResBlock's time projection is left out: the cached tables store this feature with
    every entry, and the estimate fits new blocks against the stored ones.
    """
    f = sum(layer.flops for layer in block_layers(cfg, block) if not layer.name.endswith(".temb"))
    return float(f * batch)


def _estimate(entries: dict[str, dict[str, float]], key: str, flops: float) -> float:
    """A missing block from measured blocks of its kind: ``ms = a + b * flops``.

    Blocks that share every setting but the sizes (same activation, norm, ...) are used
    when there are at least two, else every block of the kind.
    """
    kind = key.split("|")[0]
    sizes = ("r=", "in=", "out=", "heads=", "d=", "steps=")
    family = "|".join(p for p in key.split("|") if not p.startswith(sizes))
    same = [(v["flops"], v["ms"]) for k, v in entries.items() if k.split("|")[0] == kind]
    close = [(v["flops"], v["ms"]) for k, v in entries.items()
             if "|".join(p for p in k.split("|") if not p.startswith(sizes)) == family]
    pts = close if len(close) >= 2 else same
    if not pts:
        raise KeyError(f"latency table has no {kind!r} block to estimate {key!r} from")
    x, y = np.array(pts).T
    if len(pts) < 2 or np.ptp(x) == 0:
        return float(np.median(y))
    b, a = np.polyfit(x, y, 1)
    b = max(b, 0.0)
    a = float(np.mean(y - b * x))
    return max(a + b * flops, float(y.min()) * 0.5)


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Need:
    """One table entry a prediction uses: its key, FLOPs and how to measure it."""

    key: str
    flops: float
    probe: Callable[[], Probe] = field(compare=False, repr=False)


def forward_needs(cfg: UNetConfig, batch: int = 1) -> list[Need]:
    """The entries of one network evaluation, one per block (repeats included)."""
    built: list[UNet] = []

    def probe_for(block: Block) -> Callable[[], Probe]:
        def make() -> Probe:
            if not built:  # built once, only when something must be measured
                built.append(UNet(cfg))
                mx.eval(built[0].parameters())
            return block_probe(built[0], block, batch)
        return make

    return [Need(block_key(cfg, b, batch), block_flops(cfg, b, batch), probe_for(b))
            for b in walk(cfg)]


def forward_latency_ms(cfg: UNetConfig, table: LatencyTable, batch: int = 1) -> float:
    """Uncalibrated latency of one network evaluation: the sum of its blocks."""
    needs = forward_needs(cfg, batch)
    table.fill(needs)
    return sum(table.lookup(n.key, n.flops) for n in needs)


def raw_latency_ms(config: Config, table: LatencyTable, batch: int = 1) -> tuple[float, float]:
    """``(raw ms, steps * blocks)`` of one sampling call: the calibration's two features.

    Under classifier-free guidance each step runs the network on twice the batch.
    """
    u, s = config.unet, config.schedule
    needs = forward_needs(u, batch * config.passes)
    pixels = float(s.steps * u.image_size ** 2 * u.channels * batch)
    sampler = Need(sampler_key(config, batch), pixels, lambda: sampler_probe(config, batch))
    table.fill([*needs, sampler])
    forward = sum(table.lookup(n.key, n.flops) for n in needs)
    return table.lookup(sampler.key, sampler.flops) + s.steps * forward, float(s.steps * len(needs))


def predict_latency_ms(config: Config, table: LatencyTable, batch: int = 1) -> float:
    """Predicted latency (ms) of one sampling call of ``batch`` images on the table's device.

    It predicts :func:`sampling_latency` on the table's clock (``engine.device.bench``'s on
    ``wall``). Blocks the table lacks are measured now (and the table saved, when it has a
    cache path), or estimated when the table does not measure.
    """
    before = table.measured
    raw, calls = raw_latency_ms(config, table, batch)
    if table.measured > before and table.path is not None:
        table.save()
    scale, per_block = table.fit()
    return scale * raw + per_block * calls


def observe(config: Config, measured_ms: float, table: LatencyTable, batch: int = 1) -> None:
    """Add a measured sampling latency (on the table's clock) as a calibration point."""
    raw, calls = raw_latency_ms(config, table, batch)
    table.points.append((raw, calls, float(measured_ms)))
    if table.path is not None:
        table.save()


def calibrate(configs: list[Config], table: LatencyTable, batch: int = 1) -> tuple[float, float]:
    """Measure the sampling latency of ``configs`` on this device and fit the table to them.

    Returns:
        The fitted ``(scale, per_block_ms)``.
    """
    for config in configs:
        model = UNet(config.unet)
        mx.eval(model.parameters())
        stat = sampling_latency(model, config, batch, table.clock)
        observe(config, stat.median_ms, table, batch)
    return table.fit()
