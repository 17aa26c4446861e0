"""Markdown tables of ``benchmarks/throughput.py --compare`` results: best against best.

Each worker result holds, per config, ``rows[row][variant] = stat`` (rows ``train_bN`` and
``sample_bN``; MLX variants ``compiled``, ``eager``, ``compiled-bf16``, ``engine`` for
sampling; torch variants as in ``torch_variants.py``). For every row the summary table
puts each MLX run's fastest variant against the fastest torch variant of the same thread
count, with compile/warm-up time, peak memory and the achieved FLOP/s; a second table
lists every variant. Plain Python: the driver needs no torch and no mlx.

FLOPs come from ``engine.model.cost.flops`` (the MLX worker's ``gflops_fwd_b1``, the same
model on both sides since parameter counts are asserted equal): a train step costs 3x the
forward pass per image, a DDIM run ``steps x n`` forward passes.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "–"
    s = f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"
    return s + (f" ±{100 * spread:.0f}%" if spread is not None else "")


def row_title(row: str, steps: int) -> str:
    kind, n = row.split("_b")
    return f"train img/s, b{n}" if kind == "train" else f"DDIM-{steps} ms, b{n}"


def value(row: str, stat: dict[str, Any]) -> float | None:
    return stat.get("images_per_s" if row.startswith("train") else "ms")


def best(row: str, variants: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The fastest measured variant of ``row`` (highest img/s, lowest ms)."""
    ok = [(k, s) for k, s in variants.items() if value(row, s)]
    if not ok:
        return None
    pick = max if row.startswith("train") else min
    return pick(ok, key=lambda kv: value(row, kv[1]))


def tflops(row: str, stat: dict[str, Any], gflops_b1: float | None, steps: int) -> float | None:
    """Achieved TFLOP/s of one measurement (None without a FLOP count or a time)."""
    if not gflops_b1 or not stat.get("median_s"):
        return None
    n = int(row.split("_b")[1])
    per_call = 3 * n * gflops_b1 if row.startswith("train") else steps * n * gflops_b1
    return per_call / stat["median_s"] / 1e3


def _share(row: str, variant: str, stat: dict[str, Any], gflops: float | None, steps: int,
           peaks: list[float]) -> str:
    t = tflops(row, stat, gflops, steps)
    if t is None:
        return "–"
    if not peaks:
        return _fmt(t)
    peak = peaks[-1] if "bf16" in variant else peaks[0]
    return f"{_fmt(t)} ({100 * t / peak:.2g}%)"


def _startup(stat: dict[str, Any]) -> float | None:
    """Seconds before the first result: preparation (graph capture) plus the first call."""
    if "first_call_s" not in stat:
        return None
    return stat.get("prepare_s", 0.0) + stat["first_call_s"]


def pair(mlx_label: str, torch_labels: list[str]) -> str | None:
    """The torch run to compare an MLX run with: the same thread count, or the GPU run."""
    for lb in torch_labels:
        if mlx_label.split()[-1] == lb.split()[-1] or lb == "torch cuda" or mlx_label == "mlx gpu":
            return lb
    return torch_labels[0] if torch_labels else None


def tables(out: dict[str, Any], configs: list[str], steps: int, peaks: list[float]) -> list[str]:
    """Per config: the best-vs-best summary, then every variant."""
    runs = out["runs"]
    mlx_labels = [lb for lb in runs if lb.startswith("mlx")]
    torch_labels = [lb for lb in runs if lb.startswith("torch")]
    peak_note = (f"peak {peaks[0]} TFLOP/s fp32" + (f", {peaks[-1]} bf16" if len(peaks) > 1
                                                    else "")) if peaks else "no peak given"
    lines: list[str] = []
    for name in configs:
        first = next((runs[lb]["configs"][name] for lb in mlx_labels), {})
        gflops = first.get("gflops_fwd_b1")
        params = first.get("params_cost", first.get("params_model"))
        lines.append(f"\n**{name}** ({params} params, "
                     f"{gflops if gflops is None else round(gflops, 3)} GFLOP/forward at b1)\n")
        head = ["metric", "MLX run", "MLX best", "torch best", "MLX ÷ torch",
                "MLX start-up s", "torch start-up s", "MLX peak MiB", "torch peak MiB",
                "MLX TFLOP/s (% of peak)", "torch TFLOP/s (% of peak)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = sorted(dict.fromkeys(r for lb in runs for r in runs[lb]["configs"][name]
                                    .get("rows", {})),
                      key=lambda r: (not r.startswith("train"), int(r.split("_b")[1])))
        for row in rows:
            for m in mlx_labels:
                t = pair(m, torch_labels)
                mb = best(row, runs[m]["configs"][name].get("rows", {}).get(row, {}))
                tb = best(row, runs[t]["configs"][name].get("rows", {}).get(row, {})) if t else None
                cells = [row_title(row, steps), m]
                for b in (mb, tb):
                    cells.append(f"{_fmt(value(row, b[1]), b[1]['spread'])} ({b[0]})" if b
                                 else "–")
                if mb and tb:
                    a, c = value(row, mb[1]), value(row, tb[1])
                    cells.append(f"{(a / c if row.startswith('train') else c / a):.2f}×")
                else:
                    cells.append("–")
                cells += [_fmt(_startup(b[1])) if b else "–" for b in (mb, tb)]
                cells += [_fmt(b[1].get("peak_mib")) if b else "–" for b in (mb, tb)]
                cells += [_share(row, b[0], b[1], gflops, steps, peaks) if b else "–"
                          for b in (mb, tb)]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("\nEvery variant:\n")
        head = ["metric", "run", "variant", "value", "first call s", "prepare s", "peak MiB",
                "TFLOP/s (% of peak)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            for lb in runs:
                for variant, stat in runs[lb]["configs"][name].get("rows", {}).get(row, {}).items():
                    if "error" in stat or "skipped" in stat:
                        note = stat.get("error") or f"skipped: {stat['skipped']}"
                        lines.append(f"| {row_title(row, steps)} | {lb} | {variant} | "
                                     f"{note.replace('|', '/')} | | | | |")
                        continue
                    lines.append(
                        f"| {row_title(row, steps)} | {lb} | {variant} | "
                        f"{_fmt(value(row, stat), stat.get('spread'))} | "
                        f"{_fmt(stat.get('first_call_s'))} | {_fmt(stat.get('prepare_s'))} | "
                        f"{_fmt(stat.get('peak_mib'))} | "
                        f"{_share(row, variant, stat, gflops, steps, peaks)} |")
    lines.append("\nRatios are MLX speed ÷ PyTorch speed (> 1: MLX faster), each side's fastest "
                 "variant, at the same thread count (on a CPU, a run at n threads is confined to "
                 "n cores, every thread and process it starts included); ± is the spread "
                 "(IQR / median) of the "
                 "timed windows. Start-up: preparation (CUDA graph warm-up and capture) plus "
                 "the first call (compilation, kernel JIT, cuDNN autotuning). Peak: "
                 "mx.get_peak_memory / torch.cuda.max_memory_allocated over the variant (– on "
                 "a CPU torch; at n threads on a CPU the engine splits training and per-sample "
                 "sampling over n processes, engine.device.peers, and MLX's peak is then the "
                 "measuring process's share). TFLOP/s from engine.model.cost FLOPs "
                 f"({peak_note}).")
    return lines
