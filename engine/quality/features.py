"""Feature networks for FID/KID: a small CNN whose penultimate layer embeds images.

The built-in digits use a shipped classifier (``assets/feature_net_digits.safetensors``).
A user's dataset gets its own network, trained once and cached by dataset fingerprint:
a classifier when the dataset has labels, otherwise a rotation predictor (Gidaris et al.
2018, "Unsupervised Representation Learning by Predicting Image Rotations").

Retrain the shipped network (fixed seed, 1500 steps; 3-7 minutes on two CPU cores with
OpenBLAS preloaded; bit-identical on one machine, close elsewhere)::

    python -m engine.quality.features --retrain --out engine/assets/feature_net_digits.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from engine.data.datasets import Dataset, dataset_fingerprint, load_dataset, resize_images
from engine.device import compile_mode

__all__ = [
    "DIGITS_WEIGHTS",
    "FeatureNetConfig",
    "FeatureNetwork",
    "digits_feature_network",
    "feature_network_for",
    "train_feature_network",
]

DIGITS_WEIGHTS = Path(__file__).parent.parent / "assets" / "feature_net_digits.safetensors"
# The shipped network never sees digits.split(*DIGITS_HOLDOUT)[1]; tests measure accuracy on it.
DIGITS_HOLDOUT = (0.1, 0)
TASKS = ("classify", "rotation")


@dataclass(frozen=True)
class FeatureNetConfig:
    """Shape of a feature network; stored as JSON in the weights file's metadata."""

    in_channels: int = 1
    num_classes: int = 10
    input_size: int = 28
    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    task: str = "classify"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 2 or self.input_size < 16 or self.feature_dim < 1:
            raise ValueError(f"invalid feature network config {self}")


class FeatureCNN(nn.Module):
    """Three 3x3 conv stages at 1, 1/2 and 1/4 scale, then a ``feature_dim`` embedding.

    The embedding reads a coarse ``input_size // 8`` grid rather than a global average, so
    it keeps where strokes are; it also trained far faster than global pooling here.
    """

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        c1, c2, c3 = config.widths
        self.conv1 = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        grid = config.input_size // 8
        self.embed = nn.Linear(c3 * grid * grid, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.pool = nn.MaxPool2d(2, 2)
        self.grid_pool = nn.AvgPool2d(2, 2)

    def features(self, x: mx.array) -> mx.array:
        """``(N, S, S, C)`` -> ``(N, feature_dim)`` pre-activation embedding."""
        x = self.pool(nn.relu(self.conv1(x)))
        x = self.pool(nn.relu(self.conv2(x)))
        x = self.grid_pool(nn.relu(self.conv3(x)))  # (N, input_size // 8, same, c3)
        x = x.reshape(x.shape[0], -1)
        # Pre-ReLU values are dense and closer to Gaussian, which the Frechet distance assumes.
        return self.embed(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(nn.relu(self.features(x)))


class FeatureNetwork:
    """A trained :class:`FeatureCNN` with its config, usable on numpy images of any size."""

    def __init__(self, model: FeatureCNN, config: FeatureNetConfig, info: dict[str, str]) -> None:
        self.model = model
        self.config = config
        self.info = info

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Embed NHWC images in [-1, 1]; any square size is resized to ``input_size``.

        Args:
            images: ``(N, H, W, in_channels)`` images.
            batch_size: Images per forward pass, bounding memory.

        Returns:
            ``(N, feature_dim)`` float64 features.

        Raises:
            ValueError: If the images are not NHWC with ``in_channels`` channels.
        """
        return self._map(images, batch_size, self.model.features)

    def predict(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Return the argmax class ``(N,)`` of NHWC images in [-1, 1]."""
        return self._map(images, batch_size, self.model).argmax(axis=1)

    def probabilities(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Class probabilities (softmax of the logits) of NHWC images in [-1, 1].

        Args:
            images: ``(N, H, W, in_channels)`` images; any square size.
            batch_size: Images per forward pass, bounding memory.

        Returns:
            ``(N, num_classes)`` float64, each row summing to 1.

        Raises:
            ValueError: If the images are not NHWC with ``in_channels`` channels.
        """
        logits = self._map(images, batch_size, self.model)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))

    def _map(
        self, images: np.ndarray, batch_size: int, fn: Callable[[mx.array], mx.array]
    ) -> np.ndarray:
        if images.ndim != 4 or images.shape[3] != self.config.in_channels:
            raise ValueError(
                f"feature network expects NHWC images with {self.config.in_channels} "
                f"channel(s), got shape {images.shape}"
            )
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = resize_images(images[start : start + batch_size], self.config.input_size)
            outputs.append(np.array(fn(mx.array(chunk)), dtype=np.float64))
        return np.concatenate(outputs)

    def save(self, path: str | Path) -> None:
        """Write weights and config atomically to a safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**self.info, "config": json.dumps(asdict(self.config))}
        fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            mx.save_safetensors(tmp, dict(tree_flatten(self.model.parameters())), metadata)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def to_bytes(self) -> bytes:
        """The safetensors file as bytes, for shipping to a worker without shared storage."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.safetensors"
            self.save(path)
            return path.read_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureNetwork:
        """Inverse of :meth:`to_bytes`; raises ValueError on corrupt bytes."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.safetensors"
            path.write_bytes(data)
            return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureNetwork:
        """Load a network written by :meth:`save`.

        Raises:
            ValueError: If the file is missing, corrupt, or its weights do not fit its config.
        """
        try:
            weights, metadata = cast(
                tuple[dict[str, mx.array], dict[str, str]], mx.load(str(path), return_metadata=True)
            )
            config_dict = json.loads(metadata.pop("config"))
            config = FeatureNetConfig(**{**config_dict, "widths": tuple(config_dict["widths"])})
            model = FeatureCNN(config)
            model.load_weights(list(weights.items()), strict=True)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot load feature network {path}: {exc}") from None
        mx.eval(model.parameters())
        return cls(model, config, dict(metadata))


@lru_cache(maxsize=1)
def digits_feature_network() -> FeatureNetwork:
    """The shipped classifier for the built-in digits (grey, 28 px input)."""
    return FeatureNetwork.load(DIGITS_WEIGHTS)


def feature_network_for(
    dataset: Dataset,
    cache_dir: str | Path,
    steps: int = 600,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> FeatureNetwork:
    """Return the feature network for ``dataset``, training and caching it on first use.

    Args:
        dataset: The real data. Built-in grey digits get the shipped network.
        cache_dir: Folder holding ``feature_net_<fingerprint>.safetensors`` files.
        steps: Training steps when no cached network exists.
        seed: Training seed when no cached network exists.
        on_step: Called as ``on_step(done, steps)`` while training (never on a cache hit),
            so a caller can show progress: training takes tens of seconds on a CPU.

    Returns:
        The feature network; a classifier if the dataset has labels, else a rotation net.
    """
    if dataset.builtin and dataset.channels == 1:
        return digits_feature_network()
    fingerprint = dataset_fingerprint(dataset)
    path = Path(cache_dir) / f"feature_net_{fingerprint}.safetensors"
    if path.exists():
        try:
            net = FeatureNetwork.load(path)
            if net.info.get("fingerprint") == fingerprint:
                return net
        except ValueError:
            pass  # A corrupt or foreign cache entry is rebuilt below.
    net = train_feature_network(dataset, steps=steps, seed=seed, on_step=on_step)
    net.save(path)
    return net


def train_feature_network(
    dataset: Dataset,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    on_step: Callable[[int, int], None] | None = None,
) -> FeatureNetwork:
    """Train a feature network on ``dataset`` (classifier with labels, else rotations).

    Args:
        dataset: Training images; any integer labels with at least 2 distinct values make
            a classifier (over the distinct values, in sorted order).
        steps: Optimiser steps (Adam with cosine decay).
        seed: Seeds initialisation, batches and augmentation.
        batch_size: Images per step.
        lr: Peak learning rate.
        on_step: Called as ``on_step(done, steps)`` after every step (progress display).

    Returns:
        The trained network; ``info`` records the task, dataset fingerprint and steps.
    """
    fingerprint = dataset_fingerprint(dataset)
    classes, targets = np.unique(
        dataset.labels if dataset.labels is not None else [], return_inverse=True
    )
    labelled = len(classes) >= 2
    config = FeatureNetConfig(
        in_channels=dataset.channels,
        num_classes=len(classes) if labelled else 4,
        input_size=28 if dataset.builtin else int(np.clip(dataset.image_size, 16, 32)),
        task="classify" if labelled else "rotation",
    )
    # Targets 0..K-1 whatever the label values; the images array is shared, not copied.
    dataset = Dataset(dataset.images, targets if labelled else None, dataset.name, dataset.builtin)
    mx.random.seed(seed)
    model = FeatureCNN(config)
    optimizer = optim.Adam(learning_rate=optim.cosine_decay(lr, steps))
    step = _compiled_step(model, optimizer)
    rng = np.random.default_rng(seed)
    for done in range(1, steps + 1):
        x, y = _training_batch(dataset, config, rng, batch_size)
        mx.eval(step(mx.array(x), mx.array(y)), model.state, optimizer.state)
        if on_step is not None:
            on_step(done, steps)
    _standardise_features(model, dataset, config)
    info = {"task": config.task, "fingerprint": fingerprint, "steps": str(steps)}
    return FeatureNetwork(model, config, info)


def _standardise_features(model: FeatureCNN, dataset: Dataset, config: FeatureNetConfig) -> None:
    """Rescale the embedding to unit RMS on the training data, leaving logits unchanged.

    KID's kernel (x.y / D + 1)^3 assumes features of order 1 (as Inception's are); raw
    embeddings here reach x.y / D ~ 10, where the cubic term alone dominates and the
    estimate is noisier. relu(s f) = s relu(f) for s > 0, so dividing the head by s keeps
    every prediction.
    """
    sample = resize_images(dataset.images[:: max(1, len(dataset) // 2000)], config.input_size)
    scale = 1.0 / float(np.sqrt(np.mean(np.square(np.array(model.features(mx.array(sample)))))))
    model.embed.weight = model.embed.weight * scale
    model.embed.bias = model.embed.bias * scale
    model.head.weight = model.head.weight / scale
    mx.eval(model.parameters())


def _compiled_step(model: FeatureCNN, optimizer: optim.Optimizer) -> Callable[..., mx.array]:
    def loss_fn(x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = loss_and_grad(x, y)
        optimizer.update(model, grads)
        return loss

    return compile_mode.whole(step, inputs=state, outputs=state)


def _training_batch(
    dataset: Dataset, config: FeatureNetConfig, rng: np.random.Generator, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """An augmented batch ``(images at input_size, targets)``."""
    idx = rng.integers(0, len(dataset), size=batch_size)
    images, labels = dataset.batch(idx)
    images = _augment(resize_images(images, config.input_size), rng)
    if config.task == "classify":
        assert labels is not None  # a classifier is only built for labelled data
        return images, labels
    turns = rng.integers(0, 4, size=batch_size)
    rotated = np.stack([np.rot90(img, k, axes=(0, 1)) for img, k in zip(images, turns)])
    return rotated, turns


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by up to 2 px, and blur half the batch through a smaller size and back.

    The blur matches what the network sees when it embeds 8 or 16 px samples.
    """
    size = images.shape[1]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 5, size=2)
    images = padded[:, dy : dy + size, dx : dx + size]
    half = len(images) // 2
    small = int(rng.choice([max(4, size // 4), max(4, size // 2)]))
    blurred = resize_images(resize_images(images[:half], small), size)
    return np.concatenate([blurred, images[half:]]).astype(np.float32)


def _accuracy(net: FeatureNetwork, dataset: Dataset) -> float:
    return float((net.predict(dataset.images) == dataset.labels).mean())


def main() -> None:
    """CLI: ``python -m engine.quality.features --retrain --out PATH`` rebuilds the digits network."""
    parser = argparse.ArgumentParser(description="Retrain the shipped digits feature network.")
    parser.add_argument("--retrain", action="store_true", required=True)
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, _ = load_dataset("digits", image_size=28).split(*DIGITS_HOLDOUT)
    net = train_feature_network(train, steps=args.steps, seed=args.seed)
    for size in (8, 16, 28, 32):
        _, held = load_dataset("digits", image_size=size).split(*DIGITS_HOLDOUT)
        accuracy = _accuracy(net, held)
        net.info[f"heldout_accuracy_{size}px"] = f"{accuracy:.4f}"
        print(f"held-out accuracy at {size} px: {accuracy:.4f} ({len(held)} images)")
    net.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
