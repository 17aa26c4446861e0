import json

import numpy as np
import pytest

from engine.config import LIMITS, Config, ScheduleConfig, TrainConfig, UNetConfig, field_value


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
    (TrainConfig, "lr_decay", "linear"),
    (TrainConfig, "loss_weight", "p2"),
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


@pytest.mark.parametrize(("kind", "field", "value", "expected"), [
    (TrainConfig, "steps", True, "TrainConfig.steps: expected int, got True"),
    (TrainConfig, "steps", 10.5, "TrainConfig.steps: expected int, got 10.5"),
    (TrainConfig, "batch_size", "8", "TrainConfig.batch_size: expected int, got '8'"),
    (TrainConfig, "learning_rate", "abc", "TrainConfig.learning_rate: expected a finite number"),
    (TrainConfig, "learning_rate", float("inf"), "TrainConfig.learning_rate: expected a finite"),
    (TrainConfig, "checkpointing", 1, "TrainConfig.checkpointing: expected true or false, got 1"),
    (UNetConfig, "width_mults", "12", "UNetConfig.width_mults: expected a list, got '12'"),
    (UNetConfig, "width_mults", (1, True), "UNetConfig.width_mults[1]: expected int, got True"),
    (UNetConfig, "activation", 3, "UNetConfig.activation: expected str, got 3"),
    (ScheduleConfig, "timesteps", "0.5", "ScheduleConfig.timesteps: expected a list"),
])
def test_types_are_exact_and_the_message_names_the_field(kind, field, value, expected):
    with pytest.raises(ValueError) as err:
        kind(**{field: value})
    assert str(err.value).startswith(expected), err.value


def test_integral_numbers_are_normalised():
    config = Config.from_dict({"train": {"steps": 10.0, "learning_rate": 1},
                               "unet": {"base_width": np.int64(16), "width_mults": [1, 2.0]}})
    assert config.train.steps == 10 and type(config.train.steps) is int
    assert type(config.train.learning_rate) is float
    assert type(config.unet.base_width) is int and config.unet.width_mults == (1, 2)
    assert field_value(TrainConfig, "steps", 12.0) == 12


@pytest.mark.parametrize(("kind", "field", "value"), [
    (UNetConfig, "base_width", int(1e9)), (UNetConfig, "base_width", LIMITS["base_width"] + 4),
    (UNetConfig, "width_mults", (1, LIMITS["width_mult"] + 1)),
    (UNetConfig, "width_mults", (1,) * (LIMITS["levels"] + 1)),
    (UNetConfig, "num_res_blocks", LIMITS["num_res_blocks"] + 1),
    (UNetConfig, "norm_groups", 0), (UNetConfig, "time_emb_dim", LIMITS["time_emb_dim"] + 2),
    (ScheduleConfig, "steps", LIMITS["sample_steps"] + 1),
    (TrainConfig, "steps", LIMITS["train_steps"] + 1),
    (TrainConfig, "batch_size", LIMITS["batch_size"] + 1),
    (TrainConfig, "seed", -1),
])
def test_absurd_sizes_are_refused(kind, field, value):
    with pytest.raises(ValueError, match=f"{kind.__name__}.{field}="):
        kind(**{field: value})


def test_the_widest_level_is_capped():
    UNetConfig(base_width=LIMITS["base_width"], width_mults=(1, 4))  # 4096 channels: allowed
    with pytest.raises(ValueError, match="widest level 8192"):
        UNetConfig(base_width=LIMITS["base_width"], width_mults=(1, 8))
