"""Checkpoints: weights, EMA weights and optimizer state in safetensors, config in JSON.

A checkpoint is a folder::

    config.json          {"format": 1, "config": {...}, "step": n, "history": [...]}
    model.safetensors    training weights
    ema.safetensors      EMA weights (what sampling uses)
    optimizer.safetensors

Loading validates every file against the config and names the culprit on failure.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from engine.config import Config
from engine.model.unet import UNet
from engine.training.train import EvalPoint, TrainState, init_state

FORMAT = 1
FILES = ("config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config."""


def save_checkpoint(state: TrainState, folder: str | Path) -> Path:
    """Write ``state`` to ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        dict(tree_flatten(state.model.parameters())))
    mx.save_safetensors(str(folder / "ema.safetensors"), dict(tree_flatten(state.ema)))
    mx.save_safetensors(str(folder / "optimizer.safetensors"),
                        dict(tree_flatten(state.optimizer.state)))
    meta = {"format": FORMAT, "config": state.config.to_dict(), "step": state.step,
            "history": [asdict(p) for p in state.history],
            "pending_losses": state.pending_losses}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing checkpoint file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint config ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a diffnas checkpoint (format {FORMAT})")
    return meta


def _read_tensors(path: Path) -> dict[str, mx.array]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        tensors = mx.load(str(path))
    except Exception as err:  # MLX raises RuntimeError/ValueError for truncated files
        raise CheckpointError(f"{path}: truncated or corrupt safetensors ({err})") from None
    assert isinstance(tensors, dict)
    return tensors


def _check_match(path: Path, tensors: dict[str, mx.array], expected: dict[str, mx.array]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        raise CheckpointError(f"{path}: does not match its config ({'missing' if missing else 'unexpected'} "
                              f"tensor {name!r})")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"config expects {tuple(value.shape)}")


def load_config(folder: str | Path) -> Config:
    """Only the config of a checkpoint."""
    path = Path(folder) / "config.json"
    try:
        return Config.from_dict(_read_meta(path)["config"])
    except (ValueError, TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid config ({err})") from None


def load_weights(folder: str | Path, ema: bool = True) -> tuple[Config, UNet]:
    """A U-Net with the checkpoint's EMA (default) or training weights, ready to sample."""
    folder = Path(folder)
    config = load_config(folder)
    model = UNet(config.unet)
    path = folder / ("ema.safetensors" if ema else "model.safetensors")
    tensors = _read_tensors(path)
    _check_match(path, tensors, dict(tree_flatten(model.parameters())))
    model.update(tree_unflatten(list(tensors.items())))
    mx.eval(model.parameters())
    return config, model


def load_checkpoint(folder: str | Path) -> TrainState:
    """The full training state, to resume training exactly where it stopped.

    Raises:
        CheckpointError: naming the file that is missing, corrupt or mismatched.
    """
    folder = Path(folder)
    meta = _read_meta(folder / "config.json")
    state = init_state(load_config(folder))
    expected = dict(tree_flatten(state.model.parameters()))
    for name in ("model.safetensors", "ema.safetensors"):
        tensors = _read_tensors(folder / name)
        _check_match(folder / name, tensors, expected)
        tree = tree_unflatten(list(tensors.items()))
        if name == "model.safetensors":
            state.model.update(tree)
        else:
            state.ema = tree
    opt_path = folder / "optimizer.safetensors"
    opt_tensors = _read_tensors(opt_path)
    _check_match(opt_path, opt_tensors, dict(tree_flatten(state.optimizer.state)))
    state.optimizer.state = tree_unflatten(list(opt_tensors.items()))
    state.step = int(meta.get("step", 0))
    state.history = [EvalPoint(**p) for p in meta.get("history", [])]
    state.pending_losses = [float(v) for v in meta.get("pending_losses", [])]
    mx.eval(state.model.parameters(), state.ema, state.optimizer.state)
    return state
