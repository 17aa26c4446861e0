"""The memory model: predictions against mx.get_peak_memory on held-out U-Nets."""

from dataclasses import replace

from engine.device.memory.fit import CALIBRATION_CONFIGS
from engine.device.memory.measure import measure_sampling_mb, measure_train_step_mb
from engine.device.memory.model import predict

TOLERANCE = 0.20


def test_predictions_within_20_percent_of_measured(held_out, make_config):
    assert held_out not in CALIBRATION_CONFIGS.values()  # predictions must generalise
    config = make_config(held_out, batch_size=16)
    profile = predict(config, sample_n=8)
    for predicted, measured in ((profile.train_step_mb, measure_train_step_mb(config)),
                                (profile.sample_bn_mb, measure_sampling_mb(config, 8))):
        assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_checkpointing_and_bf16_lower_the_measured_training_peak(attention, make_config):
    config = make_config(attention, batch_size=16)
    plain = measure_train_step_mb(config)
    ckpt = measure_train_step_mb(replace(config, train=replace(config.train, checkpointing=True)))
    low = measure_train_step_mb(replace(config, train=replace(config.train, dtype="bfloat16")))
    assert ckpt < 0.9 * plain
    assert low < 0.9 * plain
    assert predict(config).train_step_mb > predict(replace(
        config, train=replace(config.train, checkpointing=True))).train_step_mb
