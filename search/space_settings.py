"""The settings tables of a space file: how the study runs, on what data, how a trial is
evaluated, its rungs, its hard limits and architecture adaptation.

One frozen record per table (``[study]``, ``[data]``, ``[evaluate]``, ``[rungs]``,
``[constraints]``, ``[adapt]``), validated on construction: a bad value raises
``ValueError`` whose message starts with the key, so that :mod:`search.space_toml` can
point at its line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

SAMPLERS = ("tpe", "nsga2")
MEMORY_OBJECTIVES = ("sample", "train", "max")


@dataclass(frozen=True)
class StudySettings:
    """How the study runs: target trial count, sampler, seed, pruner, hardware, evolution.

    ``latency_table``: every worker measures a latency table of its device class, so that
    the coordinator predicts each candidate's latency before dispatch (search.hooks.hardware).
    ``target_device``: the device class whose latency the study reports (default: the
    first class seen). ``mutation_rate``: the share of trials that mutate a Pareto-front
    trial instead of asking the sampler; such a child starts from its parent's weights and
    trains for ``inherit_budget`` of the training steps (search.hooks.evolution).
    """

    trials: int = 12
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "none"
    prune_dominated: bool = False  # mo-asha: also prune at stage 1 on best-case dominance
    startup_trials: int = 10
    population: int = 8
    reference_point: tuple[float, ...] = ()
    latency_table: bool = True
    target_device: str = ""
    mutation_rate: float = 0.0
    inherit_budget: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference_point", tuple(float(v) for v in self.reference_point))
        _require(self.trials >= 1, "trials", "must be >= 1")
        _require(self.sampler in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}")
        _require(self.startup_trials >= 0, "startup_trials", "must be >= 0")
        _require(self.population >= 2, "population", "must be >= 2")
        _require(len(self.reference_point) in (0, 3), "reference_point",
                 "needs 3 values: fid, latency_ms, peak_mem_mb")
        _require(0.0 <= self.mutation_rate <= 1.0, "mutation_rate", "must be in [0, 1]")
        _require(0.0 < self.inherit_budget <= 1.0, "inherit_budget", "must be in (0, 1]")
        _require(not self.target_device or self.latency_table, "target_device",
                 "needs latency_table = true (latency is converted through the tables)")


@dataclass(frozen=True)
class DataSettings:
    """The dataset every trial trains on (shipped to workers by the coordinator)."""

    dataset: str = "digits"
    image_size: int = 16
    val_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.image_size >= 4, "image_size", "must be >= 4")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")


@dataclass(frozen=True)
class EvalSettings:
    """The final evaluation of a trial and how its objectives are measured."""

    fid_samples: int = 500
    grid_images: int = 64
    memory: str = "sample"
    latency_runs: int = 5
    latency_rounds: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.fid_samples >= 4, "fid_samples", "must be >= 4")
        _require(self.grid_images >= 1, "grid_images", "must be >= 1")
        _require(self.memory in MEMORY_OBJECTIVES, "memory",
                 f"must be one of {', '.join(MEMORY_OBJECTIVES)}")
        _require(self.latency_runs >= 5, "latency_runs", "must be >= 5 (measurement protocol)")
        _require(1 <= self.latency_rounds <= 20, "latency_rounds", "must be in 1..20")


@dataclass(frozen=True)
class RungSettings:
    """Rungs at ``min_steps * eta**k`` training steps; ``min_steps = 0`` means only the end."""

    min_steps: int = 0
    eta: int = 3

    def __post_init__(self) -> None:
        _require(self.min_steps >= 0, "min_steps", "must be >= 0")
        _require(self.eta >= 2, "eta", "must be >= 2")

    def steps(self, total: int) -> tuple[int, ...]:
        """The rung steps for a trial of ``total`` training steps; the last is ``total``."""
        out: list[int] = []
        step = self.min_steps
        while 0 < step < total:
            out.append(step)
            step *= self.eta
        return (*out, total)


@dataclass(frozen=True)
class Constraints:
    """Optional hard limits; a trial over one is infeasible (recorded via set_constraint)."""

    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_params: int | None = None
    max_flops: int | None = None  # per forward pass at batch 1 (engine.model.cost)
    # The whole trial (measurement, training, validation, evaluation) on its worker:
    # predicted before anything is built, then measured at every phase (engine.device.memory).
    max_trial_memory_mb: float | None = None
    # Stage 0 prunes on the predicted latency (search.hooks.hardware) only when it is over
    # max_latency_ms by more than this fraction: the predictor is not exact.
    latency_margin: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_"):
                _require(value is None or value > 0, f.name, "must be > 0")
        _require(self.latency_margin >= 0, "latency_margin", "must be >= 0")

    def limits(self) -> dict[str, float]:
        """The set limits by name (``latency_ms``, ``memory_mb``, ``params``, ``flops``,
        ``trial_memory_mb``)."""
        return {f.name.removeprefix("max_"): float(getattr(self, f.name))
                for f in fields(self)
                if f.name.startswith("max_") and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class AdaptSettings:
    """Architecture adaptation during training (search.hooks.adapt), off unless switched on.

    At a rung before the last, a running trial is stopped and continued as a new trial
    whose architecture is one morphism away and whose weights are its own, morphed:

    - ``shrink_above_ms``: its latency (target device) is over this: narrow, shallower or
      without an attention level, the largest such neighbour that is predicted to fit;
    - ``grow``: its validation loss improved by less than ``plateau`` (relative) over the
      last ``patience`` validation points (every ``eval_every`` steps and at every rung)
      and is above ``target_loss`` (default: the
      median validation loss of the study's trials at that step): wider, deeper or with
      attention, the neighbour predicted to cost the least latency.

    The new trial trains for the steps its parent had left. ``max_depth`` caps how many
    adaptations one lineage makes.
    """

    grow: bool = False
    plateau: float = 0.02
    patience: int = 2
    target_loss: float | None = None
    shrink_above_ms: float | None = None
    max_depth: int = 2

    def __post_init__(self) -> None:
        _require(self.plateau >= 0, "plateau", "must be >= 0")
        _require(self.patience >= 1, "patience", "must be >= 1")
        _require(self.target_loss is None or self.target_loss >= 0, "target_loss",
                 "must be >= 0")
        _require(self.shrink_above_ms is None or self.shrink_above_ms > 0, "shrink_above_ms",
                 "must be > 0")
        _require(self.max_depth >= 1, "max_depth", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.grow or self.shrink_above_ms is not None


SETTINGS: dict[str, type] = {"study": StudySettings, "data": DataSettings,
                             "evaluate": EvalSettings, "rungs": RungSettings,
                             "constraints": Constraints, "adapt": AdaptSettings}


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {why}")

