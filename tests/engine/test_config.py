import json

import pytest

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig


def test_round_trips_through_json():
    cfg = Config(UNetConfig(width_mults=(1, 2, 2), attn_levels=(1,)),
                 ScheduleConfig(spacing="explicit", steps=3, timesteps=(0.9, 0.4, 0.1)),
                 TrainConfig(steps=7))
    assert Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kind, field, value", [
    (UNetConfig, "activation", "swish"),
    (UNetConfig, "norm_groups", 5),
    (UNetConfig, "image_size", 17),
    (UNetConfig, "attn_levels", (3,)),
    (ScheduleConfig, "sampler", "heun"),
    (ScheduleConfig, "steps", 0),
    (ScheduleConfig, "eta", 2.0),
    (TrainConfig, "learning_rate", -1.0),
    (TrainConfig, "dtype", "int8"),
])
def test_bad_value_names_field_and_value(kind, field, value):
    with pytest.raises(ValueError) as err:
        kind(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_explicit_timesteps_must_descend():
    with pytest.raises(ValueError, match="timesteps"):
        ScheduleConfig(spacing="explicit", steps=2, timesteps=(0.2, 0.5))


def test_load_names_file_and_unknown_key(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"unet": {"widht": 3}}))
    with pytest.raises(ValueError, match=r"cfg.json.*'widht'"):
        Config.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json: invalid JSON at line 1"):
        Config.load(path)
    with pytest.raises(ValueError, match="missing.json: config file not found"):
        Config.load(tmp_path / "missing.json")
