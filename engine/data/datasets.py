"""Image datasets: the built-in MNIST digits, a folder of PNG/JPEG files, or an ``.npz`` file.

Every source becomes a :class:`Dataset` of float32 NHWC images in [-1, 1] at one square
size. Bad input raises :class:`DatasetError` with a one-line message naming the culprit.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BUILTIN_SIZES",
    "Dataset",
    "DatasetError",
    "dataset_fingerprint",
    "load_dataset",
    "resize_images",
]

DIGITS_PATH = Path(__file__).parent.parent / "assets" / "digits.npz"
# 28 is native; 32 pads 2 px of background per side (LeCun et al. 1998, LeNet-5 input);
# 8 and 16 are area averages, so every output pixel is the mean ink over its footprint.
BUILTIN_SIZES = (8, 16, 28, 32)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# PIL modes that carry one grey channel; every other mode is treated as colour (3 channels).
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L"}
# What PIL raises for truncated, corrupt, unknown or absurdly large files.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset path or file that cannot be used; the message names the culprit."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images ``(N, H, W, C)`` float32 in [-1, 1] with optional integer labels ``(N,)``.

    ``builtin`` marks the shipped digits, whose feature network is shipped too.
    ``class_names[i]`` names label ``i`` when labels came from folder names.
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    builtin: bool = False
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Frozen dataclass, frozen arrays: a dataset shared between trials cannot drift.
        self.images.flags.writeable = False
        if self.labels is not None:
            self.labels.flags.writeable = False

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """Side length in pixels."""
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        """1 for grey, 3 for RGB."""
        return int(self.images.shape[3])

    def batch(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Return ``(images[indices], labels[indices] or None)`` as fresh arrays."""
        idx = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return self.images[idx], labels

    def subset(self, indices: np.ndarray | list[int], suffix: str = "subset") -> Dataset:
        """Return a new dataset holding only ``indices``, named ``<name>:<suffix>``."""
        images, labels = self.batch(indices)
        return Dataset(images, labels, f"{self.name}:{suffix}", self.builtin, self.class_names)

    def split(self, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """Split randomly into disjoint ``(train, val)`` datasets.

        Args:
            val_fraction: Fraction of images in the validation part, in (0, 1).
            seed: Seed of the permutation; the same seed gives the same split.

        Returns:
            ``(train, val)``, both non-empty.

        Raises:
            ValueError: If ``val_fraction`` is outside (0, 1) or a part would be empty.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = round(len(self) * val_fraction)
        if not 0 < n_val < len(self):
            raise ValueError(f"val_fraction={val_fraction} leaves an empty part of {len(self)}")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[n_val:]), "train"), self.subset(
            np.sort(order[:n_val]), "val"
        )


def labels_of(train: Dataset, val: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """``(train labels, val labels)`` of a split, as a class-conditional training takes
    them (:func:`engine.training.train.train`), or None when the dataset has none."""
    if train.labels is None or val.labels is None:
        return None
    return train.labels, val.labels


def load_dataset(
    source: str | Path | None = None, image_size: int = 16, channels: int | None = None
) -> Dataset:
    """Load images as a :class:`Dataset` of square ``image_size`` images in [-1, 1].

    Args:
        source: ``None`` or ``"digits"`` for the built-in 5,000 MNIST digits; a folder of
            PNG/JPEG files (searched recursively; labels from first-level sub-folder names
            when every image sits in one); or an ``.npz`` file with key ``images`` (NHW or
            NHWC, uint8 0-255 or float in [0, 1] / [-1, 1]) and optional ``labels`` (N,).
        image_size: Output side length. The built-in digits allow only 8, 16, 28 and 32.
            Non-square folder images are centre-cropped to a square first.
        channels: 1 (grey) or 3 (RGB) to convert to; ``None`` keeps the source's count.

    Returns:
        The dataset.

    Raises:
        ValueError: For an unsupported ``image_size`` or ``channels``.
        DatasetError: For a missing path, an empty folder, an unreadable image, mixed
            channel counts, an npz file without ``images``, or badly shaped arrays.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if source is None or source == "digits":
        images, labels = _load_digits(image_size)
        return Dataset(_to_channels(images, channels), labels, "digits", builtin=True)
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_dir():
        return _load_folder(path, image_size, channels)
    if path.suffix.lower() == ".npz":
        return _load_npz_dataset(path, image_size, channels)
    raise DatasetError(f"unsupported dataset {path}: expected a folder of images or an .npz file")


def dataset_fingerprint(ds: Dataset) -> str:
    """Return 16 hex digits of the sha256 of the dataset's shape, image bytes and labels."""
    digest = hashlib.sha256(str(ds.images.shape).encode())
    digest.update(np.ascontiguousarray(ds.images, dtype=np.float32).tobytes())
    if ds.labels is not None:
        digest.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W, C)`` images to ``(N, size, size, C)`` float32.

    Shrinking averages each output pixel's footprint (exact area resampling); enlarging
    interpolates bilinearly with aligned pixel centres. Both are separable linear maps.
    """
    h, w = images.shape[1:3]
    if h == size and w == size:
        return images.astype(np.float32, copy=False)
    rows, cols = _resize_matrix(h, size), _resize_matrix(w, size)
    # (size, H) @ (N, H, W, C) over H, then (size, W) over W -> (N, size, size, C)
    out = np.einsum("ih,nhwc->niwc", rows, images.astype(np.float32, copy=False))
    return np.einsum("jw,niwc->nijc", cols, out).astype(np.float32)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights: box overlaps when shrinking, bilinear when enlarging."""
    if n_out <= n_in:
        edges = np.arange(n_out + 1) * (n_in / n_out)
        lo, hi = edges[:-1, None], edges[1:, None]
        pix = np.arange(n_in)[None, :]
        overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
        return (overlap / (n_in / n_out)).astype(np.float32)
    centres = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    left = np.floor(centres).astype(np.int64)
    right = np.minimum(left + 1, n_in - 1)
    frac = centres - left
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (np.arange(n_out), left), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), right), frac)
    return weights


@lru_cache(maxsize=1)
def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_PATH) as data:
        return data["images"], data["labels"]


def _load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if image_size not in BUILTIN_SIZES:
        raise ValueError(f"built-in digits come in sizes {BUILTIN_SIZES}, got {image_size}")
    raw, labels = _digits_uint8()
    images = raw[..., None].astype(np.float32) / 127.5 - 1.0
    if image_size == 32:
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    elif image_size != 28:
        # Float rounding of the area average can step a hair outside [-1, 1].
        images = np.clip(resize_images(images, image_size), -1.0, 1.0)
    return images, labels.astype(np.int64)


def _to_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """Convert NHWC images to ``channels`` (ITU-R 601 luma for RGB -> grey)."""
    have = images.shape[3]
    if channels is None or channels == have:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (images @ luma)[..., None].astype(np.float32)


def _center_crop(images: np.ndarray) -> np.ndarray:
    """Crop NHWC images to their central square, as folder images are."""
    h, w = images.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[:, top : top + side, left : left + side]


def _load_npz_dataset(path: Path, image_size: int, channels: int | None) -> Dataset:
    raw, labels = _load_npz(path)
    images = np.clip(resize_images(_center_crop(raw), image_size), -1.0, 1.0)
    return Dataset(_to_channels(images, channels), labels, path.stem)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if "images" not in arrays:
        raise DatasetError(f"{path} has no 'images' array (keys: {sorted(arrays) or 'none'})")
    images = _npz_images(path, arrays["images"])
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{path}: 'labels' must be integers of shape ({len(images)},), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    return images, labels


def _npz_images(path: Path, images: np.ndarray) -> np.ndarray:
    """Validate an npz ``images`` array and scale it to float32 NHWC in [-1, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3) or 0 in images.shape:
        hint = (
            " (NCHW? transpose to NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        )
        raise DatasetError(
            f"{path}: 'images' must be NHW or NHWC with 1 or 3 channels, got {images.shape}{hint}"
        )
    if np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_:
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DatasetError(f"{path}: integer 'images' must lie in 0..255, got {lo}..{hi}")
        return images.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(images.dtype, np.floating):
        raise DatasetError(f"{path}: 'images' must be uint8 or float, got {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1.0 or high > 1.0:
        raise DatasetError(
            f"{path}: float 'images' must lie in [0, 1] or [-1, 1], got {low}..{high}"
        )
    # Without negative values the data is taken as [0, 1]: a [-1, 1] image has a -1 background.
    scaled = images * 2.0 - 1.0 if low >= 0.0 else images
    return scaled.astype(np.float32)


def _load_folder(root: Path, image_size: int, channels: int | None) -> Dataset:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"no PNG/JPEG images under {root}")
    if channels is None:
        channels = _common_channels(files)
    # One image decoded at a time, so a folder of large photos never sits in memory whole.
    images = np.stack([_read_square(path, image_size, channels) for path in files])
    labels, class_names = _folder_labels(root, files)
    return Dataset(images.astype(np.float32) / 127.5 - 1.0, labels, root.name, False, class_names)


def _common_channels(files: list[Path]) -> int:
    """The channel count shared by all files; only headers are read."""
    first = _probe_channels(files[0])
    for path in files[1:]:
        count = _probe_channels(path)
        if count != first:
            raise DatasetError(
                f"mixed channel counts: {files[0]} has {first}, {path} has {count} "
                f"(pass channels=1 or 3 to convert)"
            )
    return first


def _probe_channels(path: Path) -> int:
    try:
        with Image.open(path) as img:
            return 1 if img.mode in GRAY_MODES else 3
    except UNREADABLE as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def _read_square(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode, centre-crop to a square and resize one image to ``(size, size, channels)`` uint8."""
    try:
        with Image.open(path) as raw:
            raw.load()
            img = _to_8bit(raw).convert("L" if channels == 1 else "RGB")
    except UNREADABLE as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    # BOX is area averaging, matching resize_images; bilinear when enlarging.
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BILINEAR
    array = np.asarray(img.resize((size, size), resample), dtype=np.uint8)
    return array.reshape(size, size, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; PIL's own I -> L conversion clips at 255 instead."""
    if img.mode not in WIDE_GRAY_MODES:
        return img
    wide = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), mode="L")


def _folder_labels(root: Path, files: list[Path]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Label by first-level sub-folder when every image is inside one; else no labels."""
    parts = [path.relative_to(root).parts for path in files]
    if any(len(p) < 2 for p in parts):
        return None, ()
    class_names = tuple(sorted({p[0] for p in parts}))
    if len(class_names) < 2:
        return None, ()
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), class_names
