"""Progress output: plain lines off a terminal, a redrawn block on one."""

import io

from search.run.progress import LiveDisplay, LogLines, RunningTrial, Snapshot, for_stream


def _snapshot(complete, messages=()):
    running = (RunningTrial(5, 0, "demo-w0", "training", 123, 45, "n0", 12.0),)
    return Snapshot("demo", 12, complete, 1, 0, running, 0, 2, 3, 42.5, 65.0, 130.0,
                    tuple(messages))


def test_log_lines_print_messages_and_changes_only():
    out = io.StringIO()
    progress = LogLines(out)
    progress.update(_snapshot(2, ["trial 4 complete: fid 12"]))
    progress.update(_snapshot(2))  # nothing changed: no new line
    progress.update(_snapshot(3))
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial 4 complete: fid 12"
    assert len(lines) == 3 and "3/12 finished" in lines[1] and "4/12 finished" in lines[2]
    assert "front 3, HV 42.5" in lines[1] and "ETA 2:10" in lines[1]


def test_live_display_redraws_in_place():
    out = io.StringIO()
    display = LiveDisplay(out, interval_s=0.0)
    display.update(_snapshot(2))
    display.update(_snapshot(3, ["trial 6 complete"]))
    text = out.getvalue()
    assert "\x1b[2F\x1b[J" in text  # moved up over the 2-line block and cleared it
    assert "trial    5 try 1  training" in text and "trial 6 complete" in text


def test_plain_lines_when_not_a_terminal():
    assert isinstance(for_stream(io.StringIO()), LogLines)
