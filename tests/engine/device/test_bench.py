"""engine.device.bench: the throughput and peak-memory probes run on any valid config."""

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.device.bench import train_throughput

TINY = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2),
                              time_emb_dim=16),
              schedule=ScheduleConfig(steps=2),
              train=TrainConfig(steps=5, batch_size=4, warmup_steps=1, eval_every=5))


def test_train_throughput_trains_without_validation_and_counts_images():
    # It once asked for eval_every=10**9, past TrainConfig's limit: every call raised.
    assert train_throughput(TINY, steps=2, warmup=1) > 0
