"""The device lock across real processes: a measurement overlaps no training step of any
other process, steps of several processes overlap each other, and a measurement that asks
while others keep stepping gets in (the turnstile), after which they go on."""

import json
import subprocess
import sys
import time

TRAINER = """
import json, sys, time
from pathlib import Path
from workers.device_lock import DeviceLock

lock, out, stop = DeviceLock(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
steps = []
while len(steps) < 4000 and not (stop.exists() and len(steps) >= 40):
    with lock.shared():
        start = time.monotonic()
        time.sleep(0.005)
        steps.append((start, time.monotonic()))
    if len(steps) == 20:
        out.with_suffix(".ready").touch()
out.write_text(json.dumps(steps))
"""

MEASURER = """
import json, sys, time
from pathlib import Path
from workers.device_lock import DeviceLock

lock, out, stop = DeviceLock(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with lock.exclusive():
    start = time.monotonic()
    time.sleep(0.05)
    end = time.monotonic()
out.write_text(json.dumps([start, end]))
stop.touch()
"""


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


def test_a_measurement_runs_alone_while_steps_share_the_device(tmp_path):
    stop = tmp_path / "stop"
    outs = [tmp_path / f"trainer{i}.json" for i in range(2)]
    trainers = [subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path), str(out),
                                  str(stop)]) for out in outs]
    deadline = time.monotonic() + 60
    while not all(out.with_suffix(".ready").exists() for out in outs):
        assert time.monotonic() < deadline, "trainers never got going"
        time.sleep(0.01)
    measured = tmp_path / "measured.json"
    subprocess.run([sys.executable, "-c", MEASURER, str(tmp_path), str(measured), str(stop)],
                   check=True, timeout=60)
    for proc in trainers:
        assert proc.wait(timeout=60) == 0
    start, end = json.loads(measured.read_text())
    steps = [[tuple(s) for s in json.loads(out.read_text())] for out in outs]
    for mine in steps:
        assert not any(_overlap(s, (start, end)) for s in mine)
        assert any(s[1] <= start for s in mine) and any(s[0] >= end for s in mine)
        assert len(mine) < 4000  # the measurement got in while they kept stepping
    assert any(_overlap(a, b) for a in steps[0] for b in steps[1])  # shared is shared
