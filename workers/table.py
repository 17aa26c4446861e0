"""The worker's latency table: one per device class, kept on the worker's own disk.

A worker builds (or loads) its table once, before its first trial, in a child process
(``python -m workers.table``: a JSON request on stdin, the table on stdout), and sends it
to the coordinator with its profile. Every completed trial then adds its measured latency
as a calibration point (:func:`observe_trial`) and returns the grown table.

A device class is a label for one kind of device: the Ray node's ``diffnas-device-class``
label (``ray start --labels='{"diffnas-device-class": "m2-max"}'``), else ``backend:chip``
of the device fingerprint. The class is part of the table's fingerprint, so two classes
measured on one machine keep two tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from workers.device_lock import DeviceLock

CLASS_LABEL = "diffnas-device-class"
BUILD_TIMEOUT_S = 1800
FALLBACK_DIR = Path.home() / ".cache" / "diffnas" / "latency-tables"


def device_class(profile: dict[str, Any], labels: dict[str, str]) -> str:
    """The node's ``diffnas-device-class`` label, else ``backend:chip``."""
    return labels.get(CLASS_LABEL) or f"{profile['backend']}:{profile['chip']}"


def load_table(cache_dir: str | Path, device_class: str) -> Any:
    """This device's table for ``device_class``, read from ``cache_dir`` (or a new one)."""
    from engine.device.bench import device_fingerprint
    from engine.model.latency import LatencyTable

    return LatencyTable.load(cache_dir, {**device_fingerprint(), "device_class": device_class})


def build(configs: list[dict[str, Any]], cache_dir: str | Path, device_class: str
          ) -> dict[str, Any]:
    """Load the cached table and calibrate it on ``configs`` unless it already was.

    Runs under the table's lock, so a second worker of the same machine and class waits,
    then loads what the first measured. A folder that cannot be created (the coordinator's
    path on another machine) falls back to ``~/.cache/diffnas/latency-tables``.

    Returns:
        ``{"table": table dict, "cache_dir": the folder used}``.
    """
    from engine.config import Config
    from engine.model.latency import calibrate, raw_latency_ms

    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError:
        cache_dir = FALLBACK_DIR
    table = load_table(cache_dir, device_class)
    calibration = [Config.from_dict(c) for c in configs]
    with DeviceLock().exclusive(), table.locked():  # measured with the device to itself
        if len(table.points) < len(calibration):
            calibrate(calibration, table)
        else:  # calibrated before: only measure blocks these configs add
            for config in calibration:
                raw_latency_ms(config, table)
            table.save()
    return {"table": table.to_dict(), "cache_dir": str(cache_dir)}


def build_in_child(configs: list[dict[str, Any]], cache_dir: str, device_class: str
                   ) -> tuple[dict[str, Any] | None, str, str]:
    """:func:`build` in a child process, so that a crash leaves the worker alive.

    Returns:
        ``(table, cache folder, "")``, or ``(None, "", why)`` when the build failed.
    """
    from workers.process import child_env

    env, root = child_env()
    request = json.dumps({"configs": configs, "cache_dir": cache_dir,
                          "device_class": device_class})
    try:
        proc = subprocess.run([sys.executable, "-m", "workers.table"], input=request,
                              capture_output=True, text=True, env=env, cwd=root,
                              timeout=BUILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None, "", f"latency table build took over {BUILD_TIMEOUT_S} s"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, "", f"latency table build failed: {lines[-1] if lines else proc.returncode}"
    out = json.loads(proc.stdout)
    return out["table"], out["cache_dir"], ""


def observe_trial(model: Any, config: Any, table_dir: str, device_class: str,
                  measured_ms: float) -> dict[str, Any]:
    """Add a trial's sampling latency to the worker's table; returns the table.

    ``measured_ms`` is the trial's wall-clock latency; a table on the CPU clock
    (:func:`engine.model.latency.default_clock`) measures it again on its own clock.
    """
    from engine.model.latency import observe, sampling_latency

    table = load_table(table_dir, device_class)
    with table.locked():
        if table.clock != "wall":
            measured_ms = sampling_latency(model, config, 1, table.clock).median_ms
        observe(config, measured_ms, table)
    return dict(table.to_dict())


def main() -> int:
    """``python -m workers.table``: build a table from the JSON request on stdin."""
    import engine  # noqa: F401  (binds an optimised BLAS before mlx loads)

    request = json.loads(sys.stdin.read())
    out = build(request["configs"], request["cache_dir"], request["device_class"])
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
