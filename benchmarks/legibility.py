"""Does a study's best front trial draw digits? Legibility of its samples beside real digits.

"The best front trial" is the non-dominated feasible COMPLETE point of lowest FID, as
``diffnas pareto`` lists it first (:func:`search.report.front`). Its model is loaded from the
results folder the way ``diffnas export`` finds it, and draws ``--n`` samples with its own
sampler and steps. Each sample is scored by the shipped digits classifier
(:mod:`engine.quality.legibility`): *confident* when its top class probability is at least
0.9, *legible* when it is also inside that class's typical set of real digits. The same two
figures are printed for ``--n`` held-out real digits (never seen by the classifier), at the
study's image size. The study's wall time is the span from its first trial's start to its
last trial's end; the device time is the sum of its trials' child-process CPU time.

    uv run python benchmarks/legibility.py --study demo --results results --png samples.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

import engine  # noqa: F401  (binds an optimised BLAS before mlx loads)
from engine.data.datasets import Dataset, load_dataset
from engine.data.images import save_grid
from engine.io.models import load_model
from engine.measure import sample_images
from engine.quality.features import DIGITS_HOLDOUT, digits_feature_network
from engine.quality.legibility import TypicalSet, legible, typical_set
from search import report
from search.derived.points import source
from search.storage import record as rec
from search.storage import study as st

THRESHOLD = 0.9
GRID = 100  # a 10 x 10 grid


@dataclass(frozen=True)
class Score:
    """Shares of a set of images: confidently classified, and also typical of their class."""

    n: int
    confident: float
    legible: float
    classes: tuple[int, ...]  # images per predicted class

    def line(self, what: str) -> str:
        return (f"{what}: {self.confident:.1%} confident (p >= {THRESHOLD}), "
                f"{self.legible:.1%} legible (confident and typical) of {self.n}; "
                f"per class {list(self.classes)}")


def score(images: np.ndarray, typical: TypicalSet) -> Score:
    """Score ``images`` with the shipped digits network."""
    net = digits_feature_network()
    confident = legible(images, net, threshold=THRESHOLD)
    both = legible(images, net, typical, THRESHOLD)
    classes = np.bincount(net.predict(images), minlength=net.config.num_classes)
    return Score(len(images), float(confident.mean()), float(both.mean()),
                 tuple(int(c) for c in classes))


def best_front_label(study: optuna.Study) -> str:
    """The label (``"3"`` or ``"d0"``) of the front's point of lowest FID.

    Raises:
        StudyError: the study has no feasible COMPLETE trial.
    """
    front = report.front(study, st.stored_space(study))
    on = np.flatnonzero(front.on_front)
    if not len(on):
        raise st.StudyError(f"study {study.study_name!r} has no feasible COMPLETE trial")
    return front.labels[on[np.argmin(front.points[on, 0])]]


def digits(image_size: int) -> tuple[Dataset, Dataset]:
    """The built-in digits at ``image_size``, split as the classifier was trained: (seen, held out)."""
    return load_dataset("digits", image_size=image_size).split(*DIGITS_HOLDOUT)


def study_times(study: optuna.Study) -> tuple[float | None, float]:
    """``(wall_s, device_s)``: first trial start to last trial end; sum of trials' ``cpu_s``."""
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    cpu = sum(float((rec.read(t).finished.timings or {}).get("cpu_s", 0.0)) for t in trials)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under --results)")
    parser.add_argument("--trial", help="score this trial (3) or derived point (d0) instead")
    parser.add_argument("--n", type=int, default=500, help="samples, and real digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path, help="write a 10x10 grid of the samples here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # StudyError and CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    st.check_name(args.study)
    url = args.storage or st.default_storage(args.results)
    study = st.load_existing(st.open_storage(url, create=False), args.study)
    src = source(study, args.trial or best_front_label(study))
    config, model = load_model(src.folder)
    seen, held = digits(config.unet.image_size)
    net = digits_feature_network()
    typical = typical_set(net, seen.images, seen.labels)
    samples = sample_images(model, config, args.n, args.seed)
    r = rec.read(src.trial)
    s = config.schedule
    print(f"study {study.study_name}, trial {src.label}: FID {r.value('fid'):.3g}, "
          f"latency {r.value('latency_ms'):.3g} ms; {s.sampler} {s.steps} steps, "
          f"{config.train.steps} training steps")
    print(score(samples, typical).line("samples"))
    print(score(held.images[: args.n], typical).line("real digits (held out)"))
    wall, cpu = study_times(study)
    print(f"study wall time {'?' if wall is None else f'{wall:.0f} s'} (first trial start to "
          f"last end), trials' CPU time {cpu:.0f} s")
    if args.png:
        save_grid(samples[:GRID], args.png, nrow=10)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
