"""Load any model folder this project writes, ready to sample.

Three kinds of folder hold a model:

- a training checkpoint (``config.json`` + ``ema.safetensors``), from ``diffnas train``
  or a search trial; its schedule may be a tuned one (``spacing = "optimized"``);
- a distilled stage (a checkpoint plus ``distill.json``), from ``diffnas distill``;
- a compressed model (``compressed.json`` + ``model.safetensors``), from ``diffnas compress``.

:func:`load_model` tells them apart, so ``diffnas sample`` and the study verbs take any.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from mlx import nn

from engine.compression.compress import load_compressed
from engine.config import Config, ScheduleConfig
from engine.io.checkpoint import CheckpointError, load_weights
from engine.training.consistency import ConsistencyModel

__all__ = ["kind_of", "load_distilled", "load_model"]


def kind_of(folder: str | Path) -> str:
    """``"compressed"``, ``"distilled"`` or ``"checkpoint"``.

    Raises:
        CheckpointError: the folder holds none of them.
    """
    folder = Path(folder)
    if (folder / "compressed.json").is_file():
        return "compressed"
    if (folder / "distill.json").is_file():
        return "distilled"
    if (folder / "config.json").is_file():
        return "checkpoint"
    raise CheckpointError(f"{folder}: not a model folder (no config.json, distill.json or "
                          "compressed.json)")


def load_model(folder: str | Path) -> tuple[Config, nn.Module]:
    """``(config, model)`` of any model folder; ``config.schedule`` is the one it samples with.

    Raises:
        CheckpointError: a missing, corrupt or mismatched folder, naming the file.
    """
    kind = kind_of(folder)
    if kind == "compressed":
        try:
            config, _, model = load_compressed(folder)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return config, model
    if kind == "distilled":
        config, model, schedule = load_distilled(folder)
        return replace(config, schedule=schedule), model
    return load_weights(folder)


def load_distilled(folder: str | Path) -> tuple[Config, nn.Module, ScheduleConfig]:
    """A distillation stage checkpoint as ``(config, model that samples, sampling schedule)``.

    Consistency checkpoints come back wrapped in their c_skip/c_out parametrisation; a
    folder without ``distill.json`` comes back as its plain checkpoint.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint or distillation record.
    """
    folder = Path(folder)
    config, unet = load_weights(folder)
    path = folder / "distill.json"
    if not path.exists():
        return config, unet, config.schedule
    try:
        meta = json.loads(path.read_text())
        schedule = ScheduleConfig(**meta["schedule"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: corrupt distillation record ({err})") from None
    unet.eval()
    if "consistency" not in meta:
        return config, unet, schedule
    c = meta["consistency"]
    model = ConsistencyModel(unet, c["prediction"], schedule.beta_schedule, c["sigma_data"], c["eps"])
    return config, model, schedule
