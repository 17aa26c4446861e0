"""The coordinator's side of hardware awareness on hand-made latency tables (exact numbers):
target-device conversion, calibration configs, stage-0 pruning on predicted latency."""

from dataclasses import replace

import pytest

from engine.config import Config, ScheduleConfig, UNetConfig
from engine.model import latency
from search.hooks.hardware import Hardware, calibration_configs
from search.pruning.base import ConstraintPruner, Cost, stage0_values
from search.space import load_space, parse_space

CONFIG = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, time_emb_dim=32),
                schedule=ScheduleConfig(steps=4))


def table(device_class: str, scale: float) -> dict:
    """A table whose every entry is ``scale`` ms per MFLOP: predictions scale exactly."""
    needs = latency.forward_needs(CONFIG.unet)
    entries = {n.key: {"ms": scale * n.flops / 1e6, "flops": n.flops} for n in needs}
    entries[latency.sampler_key(CONFIG, 1)] = {"ms": scale, "flops": 1.0}
    fingerprint = {"chip": device_class, "device_class": device_class}
    return {"format": latency.FORMAT, "fingerprint": fingerprint, "clock": "cpu",
            "entries": entries, "points": []}


def hardware(target: str = "") -> Hardware:
    hw = Hardware(target)
    hw.learn({"device_class": "fast", "latency_table": table("fast", 1.0)})
    hw.learn({"device_class": "slow", "latency_table": table("slow", 3.0)})
    return hw


def test_latency_on_another_class_is_converted_by_the_tables_ratio():
    hw = hardware()  # the first class seen is the target
    assert hw.target == "fast"
    fast, slow = hw.predict(CONFIG), hw.predict(CONFIG, "slow")
    assert slow == pytest.approx(3 * fast)
    doc = hw.convert(CONFIG, 30.0, "slow")
    assert doc["latency_ms"] == pytest.approx(10.0) and doc["measured_ms"] == 30.0
    assert doc["ratio"] == pytest.approx(1 / 3)
    assert (doc["device_class"], doc["target_device"]) == ("slow", "fast")
    assert (doc["predicted_ms"], doc["predicted_target_ms"]) == (slow, fast)
    same = hw.convert(CONFIG, 7.0, "fast")
    assert same["latency_ms"] == 7.0 and same["ratio"] == 1.0
    unknown = hw.convert(CONFIG, 7.0, "other")
    assert unknown["latency_ms"] == 7.0 and "not converted" in unknown["note"]


def test_a_named_target_waits_for_its_class_and_an_unknown_one_is_an_error():
    hw = Hardware("slow")
    hw.learn({"device_class": "fast", "latency_table": table("fast", 1.0)})
    assert hw.waiting()
    hw.check_target(starting=1)  # a worker still starting may be of the target class
    with pytest.raises(ValueError, match=r"^target_device 'slow': no worker of that device "
                                         r"class \(classes here: fast\)$"):
        hw.check_target(starting=0)
    hw.learn({"device_class": "slow", "latency_table": table("slow", 3.0)})
    assert not hw.waiting()
    assert hardware("slow").convert(CONFIG, 1.0, "fast")["ratio"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="this study reports latency for 'fast'"):
        Hardware("slow", stored="fast")


def test_stage0_prunes_on_the_predicted_latency_beyond_the_margin():
    space = parse_space("[constraints]\nmax_latency_ms = 40\nlatency_margin = 0.1\n")
    pruner = ConstraintPruner(space)
    inside = Cost(1, 1, predicted_latency_ms=43.9, target_device="m2")
    assert pruner.prescreen(0, inside).proceed  # over the limit, inside the margin
    over = pruner.prescreen(1, replace(inside, predicted_latency_ms=50.0))
    assert not over.proceed
    assert over.reason == ("constraints stage 0: predicted latency 50 ms on m2 over the "
                           "limit 40 ms + 10% margin (+25.0%)")
    assert stage0_values(replace(inside, predicted_latency_ms=50.0))["latency_ms"] == 50.0
    assert pruner.prescreen(2, Cost(1, 1)).proceed  # nothing predicted: nothing to prune


@pytest.mark.parametrize("preset", ["smoke", "demo", "mac"])
def test_calibration_configs_cover_every_choice_of_the_space(preset):
    space = load_space(preset)
    configs = calibration_configs(space, 1)
    assert len(configs) >= 3 and len(set(configs)) == len(configs)
    for p in space.params:
        if p.kind == "choice" and p.name.startswith("unet."):
            section, key = p.name.split(".")
            shown = {str(list(v) if isinstance(v, tuple) else v)
                     for v in (getattr(getattr(c, section), key) for c in configs)}
            assert {str(c) for c in p.choices} <= shown, p.name
