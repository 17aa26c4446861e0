"""Peak memory of a candidate: predicted from analytic sizes, measured, and enforced.

- :mod:`.model`: the analytic model and its calibration (:func:`predict`).
- :mod:`.report`: what fits a budget (:func:`recommend`, :func:`format_report`).
- :mod:`.limits`: budgets enforced on a run (:func:`enforce_limit`, :func:`check_peak`).
- :mod:`.measure`: measured peaks, what the model is fitted to and checked against.
- :mod:`.fit`: the calibration that fits the model (not imported here; see
  ``benchmarks/memory_calibrate.py``).
"""

from engine.device.memory.limits import (
    MemoryBudgetExceeded,
    check_budget,
    check_peak,
    enforce_limit,
    release,
)
from engine.device.memory.measure import measure_sampling_mb, measure_train_step_mb
from engine.device.memory.model import CALIBRATION, MemoryProfile, predict
from engine.device.memory.report import Option, Recommendation, format_report, recommend

__all__ = [
    "CALIBRATION",
    "MemoryBudgetExceeded",
    "MemoryProfile",
    "Option",
    "Recommendation",
    "check_budget",
    "check_peak",
    "enforce_limit",
    "format_report",
    "measure_sampling_mb",
    "measure_train_step_mb",
    "predict",
    "recommend",
    "release",
]
