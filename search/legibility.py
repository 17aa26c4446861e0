"""Does a study's best front trial draw digits? Legibility of its samples beside real digits.

"The best front trial" is the non-dominated feasible COMPLETE point of lowest FID, the first
row of ``diffnas pareto`` (:func:`search.report.front`). Its model is loaded from the results
folder the way ``diffnas export`` finds it and draws samples with its own sampler and steps.
Each sample is scored by the shipped digits classifier (:mod:`engine.quality.legibility`):
*confident* when its top class probability is at least 0.9, *legible* when it is also inside
that class's typical set of real digits. The same shares of as many held-out real digits
(never seen by the classifier, drawn at random: :func:`held_out_digits`) give the ceiling
the measure reaches on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from engine.config import Config
from engine.data.datasets import load_dataset
from engine.io.models import load_model
from engine.measure import sample_images, sample_labels
from engine.quality.features import DIGITS_HOLDOUT, digits_feature_network
from engine.quality.legibility import TypicalSet, legible, typical_set
from search import report
from search.derived.points import source
from search.storage import record as rec
from search.storage import study as st

__all__ = ["Score", "StudyLegibility", "best_front_label", "held_out_digits", "score",
           "study_legibility"]

THRESHOLD = 0.9  # the least top class probability of a confident image


@dataclass(frozen=True)
class Score:
    """Shares of a set of images: confidently classified, and also typical of their class."""

    n: int
    confident: float
    legible: float
    classes: tuple[int, ...]  # images per predicted class
    agreement: float | None = None  # read as the class drawn (class-conditional samples)

    def line(self, what: str) -> str:
        """One line for a person: both shares, and the images per predicted class."""
        drawn = ("" if self.agreement is None
                 else f"; {self.agreement:.1%} read as the class they were drawn for")
        return (f"{what}: {self.confident:.1%} confident (p >= {THRESHOLD}), "
                f"{self.legible:.1%} legible (confident and typical) of {self.n}; "
                f"per class {list(self.classes)}{drawn}")


@dataclass(frozen=True)
class StudyLegibility:
    """One trial's samples scored beside held-out real digits."""

    label: str  # "3" for trial 3, "d0" for a derived point
    fid: float
    latency_ms: float
    config: Config
    samples: Score
    real: Score

    def lines(self) -> list[str]:
        """What ``diffnas legibility`` prints."""
        s = self.config.schedule
        guided = f", guidance {s.guidance:g}" if self.config.unet.num_classes else ""
        return [(f"trial {self.label}: FID {self.fid:.3g}, latency {self.latency_ms:.3g} ms; "
                 f"{s.sampler} {s.steps} steps{guided}, "
                 f"{self.config.train.steps} training steps"),
                self.samples.line("samples"), self.real.line("real digits (held out)")]


def score(images: np.ndarray, typical: TypicalSet, drawn: np.ndarray | None = None) -> Score:
    """Score ``(N, H, W, C)`` ``images`` in [-1, 1] with the shipped digits network;
    ``drawn`` (N,), the classes a class-conditional model drew them for, adds the share
    the network reads as those classes."""
    net = digits_feature_network()
    confident = legible(images, net, threshold=THRESHOLD)
    both = legible(images, net, typical, THRESHOLD)
    read = net.predict(images)
    classes = np.bincount(read, minlength=net.config.num_classes)
    agreement = None if drawn is None else float((read == drawn).mean())
    return Score(len(images), float(confident.mean()), float(both.mean()),
                 tuple(int(c) for c in classes), agreement)


def held_out_digits(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` of the held-out real ``images`` drawn at random (a fixed seed): the held-out
    split keeps the file's order, whose first images are nearly all 0-3."""
    return images[np.random.default_rng(seed).permutation(len(images))[:n]]


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


def study_legibility(study: optuna.Study, label: str | None = None, n: int = 500,
                     seed: int = 0) -> tuple[StudyLegibility, np.ndarray]:
    """Score ``n`` samples of trial ``label`` (default: the best front trial) of ``study``.

    Args:
        study: a study whose trials' artifacts are in its results folder.
        label: a trial number (``"3"``) or derived point (``"d0"``).
        n: samples drawn, and held-out real digits scored beside them; at least 1.
        seed: the samples' noise seed.

    Returns:
        ``(scores, samples)``: the :class:`StudyLegibility` and the ``(n, H, W, C)`` samples.

    Raises:
        ValueError: ``n`` below 1, a study whose data is not the built-in digits.
        StudyError: no such trial, or no feasible COMPLETE trial.
        CheckpointError: the trial's model is missing or damaged.
    """
    if n < 1:
        raise ValueError(f"legibility: n must be >= 1, got {n}")
    data = st.stored_space(study).data
    if data.dataset != "digits":
        raise ValueError(f"legibility: study {study.study_name!r} was trained on "
                         f"{data.dataset!r}; only the built-in digits have a classifier")
    src = source(study, label or best_front_label(study))
    config, model = load_model(src.folder)
    seen, held = load_dataset("digits", image_size=config.unet.image_size).split(*DIGITS_HOLDOUT)
    assert seen.labels is not None  # the built-in digits are labelled
    typical = typical_set(digits_feature_network(), seen.images, seen.labels)
    samples = sample_images(model, config, n, seed)
    r = rec.read(src.trial)
    fid, latency = r.value("fid"), r.value("latency_ms")
    assert fid is not None and latency is not None  # source() returns COMPLETE trials only
    drawn = sample_labels(n, config.unet.num_classes) if config.unet.num_classes else None
    scores = StudyLegibility(src.label, fid, latency, config, score(samples, typical, drawn),
                             score(held_out_digits(held.images, n), typical))
    return scores, samples
