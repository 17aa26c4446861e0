"""The device lock across real processes: a measurement overlaps no training step of any
other process, steps of several processes overlap each other, and a measurement that asks
while others keep stepping gets in (the turnstile), after which they go on."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from workers.device_lock import DeviceLock, DeviceLockTimeout

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


HOLDER = """
import sys, time
from pathlib import Path
from workers.device_lock import DeviceLock

with DeviceLock(sys.argv[1]).exclusive():
    Path(sys.argv[2]).touch()
    time.sleep(30)
"""


def test_a_lock_held_too_long_fails_the_waiter_with_the_reason(tmp_path):
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), str(held)])
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.01)
        waiter = DeviceLock(tmp_path / "locks", timeout_s=0.3)
        with pytest.raises(DeviceLockTimeout, match="waited 0.3 s for the device lock"), waiter.shared():
            pass
    finally:
        holder.kill()
        holder.wait()
    with DeviceLock(tmp_path / "locks", timeout_s=5).exclusive():  # the kernel dropped it
        pass


def test_the_lock_lives_in_a_folder_of_this_user_and_follows_no_symlink(tmp_path):
    lock = DeviceLock(tmp_path / "mine")
    with lock.shared():
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "mine").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "mine" / "diffnas-device.lock").st_mode) == 0o600
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="symlink"), DeviceLock(tmp_path / "linked").shared():
        pass
    (tmp_path / "plain").mkdir(mode=0o700)
    (tmp_path / "plain" / "diffnas-device.turnstile").symlink_to(tmp_path / "target")
    # O_NOFOLLOW: a planted symlink is not followed
    with pytest.raises(OSError), DeviceLock(tmp_path / "plain").shared():
        pass
    assert not (tmp_path / "target").exists()
