"""The engine verbs of the CLI: bad input gives one line and a non-zero exit."""

import json

import pytest

from search.cli import main


@pytest.mark.parametrize("argv, culprit", [
    (["train", "--config", "tiny", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--config", "/no/such.json"], "/no/such.json"),
    (["sample", "/no/checkpoint"], "/no/checkpoint"),
    (["bench", "--config", "BADCFG"], "BADCFG"),
])
def test_bad_input_one_line_nonzero(argv, culprit, capsys, tmp_path):
    if "BADCFG" in argv:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"unet": {"activation": "swish"}}))
        argv = [a.replace("BADCFG", str(bad)) for a in argv]
        culprit = "swish"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("diffnas: error:")
    assert culprit in err


def test_sample_from_checkpoint(tmp_path, capsys):
    from engine.config import Config
    from engine.io.checkpoint import save_checkpoint
    from engine.training.train import init_state

    save_checkpoint(init_state(Config.load("engine/configs/tiny.json")), tmp_path / "ck")
    out = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path / "ck"), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
