"""Load any model folder this project writes, ready to sample.

Three kinds of folder hold a model:

- a training checkpoint (``config.json`` + ``ema.safetensors``), from ``diffnas train``
  or a search trial; its schedule may be a tuned one (``spacing = "optimized"``);
- a distilled stage (a checkpoint plus ``distill.json``), from ``diffnas distill``;
- a compressed model (``compressed.json`` + ``model.safetensors``), from ``diffnas compress``.

:func:`load_model` tells them apart, so ``diffnas sample`` and the study verbs take any.
"""

from __future__ import annotations

from pathlib import Path

from mlx import nn

from engine.config import Config
from engine.io.checkpoint import CheckpointError


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
        from engine.compression.compress import load_compressed

        try:
            config, _, model = load_compressed(folder)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return config, model
    if kind == "distilled":
        from dataclasses import replace

        from engine.training.distill import load_distilled

        config, model, schedule = load_distilled(folder)
        return replace(config, schedule=schedule), model
    from engine.io.checkpoint import load_weights

    return load_weights(folder)
