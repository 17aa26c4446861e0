"""The calibration fit: its NNLS against brute force, its fit against data of known form."""

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from engine.device.memory.fit import CALIBRATION_CONFIGS, _errors, _nnls, fit_modes
from engine.device.memory.model import CALIBRATION, CALIBRATION_FILE, KINDS, MODES, peak_mb


def _brute_force_nnls(a, b):
    """The best least-squares solution over every support set whose solution is >= 0."""
    best, best_res = np.zeros(a.shape[1]), np.linalg.norm(b)
    for k in range(1, a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            x_s = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            if np.all(x_s >= 0):
                x = np.zeros(a.shape[1])
                x[list(support)] = x_s
                if np.linalg.norm(a @ x - b) < best_res:
                    best, best_res = x, np.linalg.norm(a @ x - b)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_nnls_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Columns of very different scale, like parameter counts next to window sizes.
    a = rng.uniform(0, 1, (12, 4)) * np.array([1.0, 10.0, 1e3, 1e-2])
    b = a @ np.array([1.0, -0.5, 2e-3, 30.0]) + 0.1 * rng.normal(size=12)
    x, oracle = _nnls(a, b), _brute_force_nnls(a, b)
    assert np.all(x >= 0)
    assert np.linalg.norm(a @ x - b) <= np.linalg.norm(a @ oracle - b) * (1 + 1e-4)
    np.testing.assert_allclose(x, oracle, rtol=1e-2, atol=1e-6 * np.abs(oracle).max())


# Coefficients that generate the peaks below: a fixed earlier calibration, so that the test
# checks the fitting procedure, not whichever table the device last produced.
GENERATING = json.loads((Path(__file__).parent / "generating_fits.json").read_text())


def test_fit_reproduces_peaks_the_model_generated():
    rows = [{"name": name, "unet": asdict(CALIBRATION_CONFIGS[name]), "mode": mode, "batch": b,
             "mb": peak_mb(CALIBRATION_CONFIGS[name], b, GENERATING[mode])}
            for name in ("c8", "c16", "c16a", "deep", "sep", "wide")
            for mode in ("sample", "float32") for b in (4, 16, 48)]
    fits, loo = fit_modes(rows)
    assert set(fits) == set(loo) == {"sample", "float32"}
    for mode, fit in fits.items():
        assert set(fit["kinds"]) == set(KINDS) and min(fit["kinds"].values()) >= 0
        errors = _errors([r for r in rows if r["mode"] == mode], fit)
        assert np.max(np.abs(errors)) < 0.05, (mode, errors)


def test_calibration_file_has_a_fit_for_every_mode():
    table = json.loads(CALIBRATION_FILE.read_text())
    assert table == CALIBRATION
    assert set(table["fits"]) == {"sample", *MODES}
    assert set(table["time"]) == {"checkpointing", "bfloat16"}
