"""``run_search`` refuses bad options (the Python API, not only the CLI) before it reads the
data or opens the storage; ``build_payload`` refuses a dataset too small for FID."""

import pytest

from search.run.dataset import build_payload
from search.run.runner import SearchOptions, run_search
from search.space_settings import DataSettings
from search.storage.paths import PathError


@pytest.mark.parametrize(("options", "message"), [
    ({"trials": 0}, "--trials: must be >= 1, got 0"),
    ({"trials": -1}, "--trials: must be >= 1, got -1"),
    ({"max_retries": -1}, "--max-retries: must be >= 0, got -1"),
    ({"timeout_s": 0.0}, "--timeout: must be > 0, got 0"),
    ({"timeout_s": float("nan")}, "--timeout: must be > 0, got nan"),
    ({"seed": -3}, "--seed: must be >= 0, got -3"),
    ({"max_latency_ms": -1.0}, "--max-latency-ms: must be > 0, got -1"),
])
def test_bad_options_are_refused_before_anything_is_written(results, storage, options, message):
    with pytest.raises(ValueError) as err:
        run_search(SearchOptions(space="smoke", results=results, storage=storage, **options))
    assert str(err.value) == message
    assert not results.exists()


def test_results_or_storage_under_a_file_is_refused_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PathError, match="--results"):
        run_search(SearchOptions(space="smoke", results=blocker / "r"))
    with pytest.raises(PathError, match=f"storage {blocker}/x.db"):
        run_search(SearchOptions(space="smoke", results=tmp_path / "r",
                                 storage=f"sqlite:///{blocker}/x.db"))
    assert not (tmp_path / "r").exists()


def test_build_payload_refuses_more_fid_samples_than_half_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"fid_samples = 2501 needs 5002 .* has 5000"):
        build_payload(DataSettings(image_size=8), tmp_path / "nets", fid_samples=2501)
    assert not (tmp_path / "nets").exists()  # before the feature network
    payload = build_payload(DataSettings(image_size=8), tmp_path / "nets", fid_samples=2500)
    assert len(payload.real) == 5000
