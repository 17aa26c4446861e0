"""The ``diffnas`` command: parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.exc import SQLAlchemyError

import engine  # binds an optimised BLAS before mlx loads
from engine.config import Config
from engine.data.datasets import load_dataset
from engine.data.images import save_grid
from engine.device.bench import bench
from engine.device.memory import format_report
from engine.experiment import QualityEval, run
from engine.io.models import load_model
from engine.measure import sample_images
from engine.quality.metrics import check_real_count
from search.cli import derived as cli_derived
from search.cli import legibility as cli_legibility
from search.cli import report as cli_report
from search.cli import study as cli_study
from search.cli.common import (
    Parser,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from search.storage import paths

CONFIGS = Path(engine.__file__).parent / "configs"


def _load_config(name_or_path: str) -> Any:

    builtin = CONFIGS / f"{name_or_path}.json"
    return Config.load(builtin if builtin.exists() and not Path(name_or_path).exists()
                       else name_or_path)


def _cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("results") / "train" / Path(args.config).stem
    paths.check_dir(out, "--out")
    config = _load_config(args.config)
    dataset = load_dataset(args.data, image_size=config.unet.image_size,
                           channels=config.unet.channels)
    check_real_count(args.eval_samples, len(dataset), "--eval-samples")
    metrics = run(config, dataset, out, QualityEval(n=args.eval_samples))
    print(f"wrote {out}/checkpoint, samples.png, metrics.json, config.json")
    print(f"FID {metrics['fid']:.2f} (real-vs-real floor {metrics['fid_floor']:.2f}), "
          f"latency {metrics['latency_ms']:.1f} ms, peak train {metrics['peak_train_mb']:.0f} MB")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    paths.check_file(Path(args.out), "--out")
    config, model = load_model(args.checkpoint)
    overrides = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v}
    if overrides:
        config = replace(config, schedule=replace(config.schedule, **overrides))
    images = sample_images(model, config, args.n, args.seed)
    save_grid(images, args.out)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:

    record = bench(_load_config(args.config), batch_n=args.batch).to_dict()
    print(json.dumps(record, indent=2))
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:

    print(format_report(_load_config(args.config), args.budget_mb))
    return 0


def _engine_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train one config on the built-in digits or --data")
    p.add_argument("--config", required=True, help="JSON config file, or a built-in: tiny, demo")
    p.add_argument("--data", help="folder of PNG/JPEG images or an .npz file (default: digits)")
    p.add_argument("--out", help="output folder (default: results/train/<config name>)")
    p.add_argument("--eval-samples", type=int_at_least(4), default=1000,
                   help="samples for FID/KID (the data needs twice as many images)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("sample", help="draw samples from a checkpoint or exported model")
    p.add_argument("checkpoint", help="checkpoint folder (with config.json)")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--steps", type=positive_int, help="override the number of sampling steps")
    p.add_argument("--sampler", help="override the sampler: ddpm, ddim, dpmpp_2m, euler")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("bench", help="latency, throughput and peak memory of a config")
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=positive_int, default=16, help="the larger sampling batch N")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("memory", help="predicted peak memory against batch size")
    p.add_argument("--config", required=True)
    p.add_argument("--budget-mb", type=positive_float,
                   help="recommend settings that fit this budget")
    p.set_defaults(func=_cmd_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffnas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _engine_commands(sub)
    cli_study.register(sub)
    cli_derived.register(sub)
    cli_report.register(sub)
    cli_legibility.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI reports in one line: bad input, and a storage that fails mid-command."""
    return (ValueError, FileNotFoundError, KeyError, PermissionError,
            optuna.exceptions.StorageInternalError, SQLAlchemyError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffnas``; user errors print one line and exit with status 2."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a refused flag (one line, printed by Parser)
        return stop.code if isinstance(stop.code, int) else 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"diffnas: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `diffnas pareto s --csv | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the last resort for a path the verbs did not check first
        where = f"{err.filename}: " if err.filename else ""
        print(f"diffnas: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffnas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
