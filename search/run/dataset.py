"""The coordinator's side of the data: load once, then ship to every worker as one payload.

A worker on another machine needs no copy of the dataset and no shared filesystem: the
payload (images plus the feature network's weights) travels through Ray's object store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from engine.data.datasets import Dataset, load_dataset
from engine.quality.features import feature_network_for
from engine.quality.metrics import check_real_count
from search.run.progress import setup_step
from search.space_settings import DataSettings
from workers.records import DataPayload


def build_payload(settings: DataSettings, cache_dir: Path, progress: object = None,
                  fid_samples: int | None = None, num_classes: int = 0) -> DataPayload:
    """Load the dataset, split train/val, and pack the feature network for FID/KID.

    Args:
        settings: the space's ``[data]`` table.
        cache_dir: where trained feature networks are cached.
        progress: shows each step as it runs (:func:`search.run.progress.setup_step`):
            loading the data, and training a feature network when none is cached.
        fid_samples: the space's ``[evaluate] fid_samples``; the dataset must hold twice
            as many images (checked here, not after every trial has trained).
        num_classes: the fewest classes of a class-conditional candidate (0: none is); the
            dataset must then have labels, all below it.

    Raises:
        ValueError: a missing or corrupt dataset (``engine.data.datasets.DatasetError``), with the path;
            or one too small for ``fid_samples``, naming both numbers; or one without
            the labels ``num_classes`` needs, naming ``[unet] num_classes``.
    """
    with setup_step(progress, f"loading dataset {settings.dataset} at {settings.image_size} px"):
        dataset = load_dataset(settings.dataset, image_size=settings.image_size)
    if fid_samples is not None:
        check_real_count(fid_samples, len(dataset), "[evaluate] fid_samples")
    if num_classes > 0:
        _check_labels(dataset, num_classes)
    train, val = dataset.split(settings.val_fraction, settings.split_seed)
    what = (f"training the FID feature network for {dataset.name} at {dataset.image_size} px "
            f"(once; cached in {cache_dir})")
    with setup_step(progress, what, lazy=True) as step:  # silent when cached or built in
        net = feature_network_for(dataset, cache_dir, on_step=step.advance)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feature_net.safetensors"
        net.save(path)
        weights = path.read_bytes()
    return DataPayload(name=dataset.name, train=train.images, val=val.images,
                       real=dataset.images, feature_net=weights, train_labels=train.labels,
                       val_labels=val.labels)


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    where = f"[unet] num_classes = {num_classes}"
    if dataset.labels is None:
        raise ValueError(f"{where}: dataset {dataset.name!r} has no labels (a folder of class "
                         "sub-folders, or an .npz with 'labels', has them)")
    top = int(dataset.labels.max()) if len(dataset.labels) else -1
    if top >= num_classes:
        raise ValueError(f"{where}: dataset {dataset.name!r} has labels up to {top}")
