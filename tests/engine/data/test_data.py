"""Tests for engine.data.datasets: built-in digits, PNG/JPEG folders, npz files and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.datasets import (
    BUILTIN_SIZES,
    Dataset,
    DatasetError,
    dataset_fingerprint,
    load_dataset,
    resize_images,
)


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --- built-in digits ---------------------------------------------------------------------


@pytest.mark.parametrize("size", BUILTIN_SIZES)
def test_builtin_digits_each_size(size: int) -> None:
    ds = load_dataset(None, image_size=size)
    assert ds.images.shape == (5000, size, size, 1)
    assert ds.images.dtype == np.float32
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.builtin and ds.name == "digits"


def test_builtin_area_resize_preserves_mean_ink() -> None:
    # Area averaging is mean-preserving per image; nearest or bilinear sampling is not.
    native = load_dataset("digits", image_size=28).images.mean(axis=(1, 2, 3))
    for size in (8, 16):
        small = load_dataset("digits", image_size=size).images.mean(axis=(1, 2, 3))
        np.testing.assert_allclose(small, native, atol=1e-5)


def test_builtin_32_pads_background_around_native() -> None:
    padded = load_dataset(image_size=32).images
    native = load_dataset(image_size=28).images
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], native)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (padded[:, border] == -1.0).all()


@pytest.mark.parametrize("size", [7, 12, 64])
def test_builtin_rejects_other_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="8, 16, 28, 32"):
        load_dataset("digits", image_size=size)


def test_builtin_as_rgb_repeats_grey() -> None:
    ds = load_dataset(image_size=8, channels=3)
    assert ds.channels == 3
    np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])


def test_split_is_disjoint_complete_and_seeded() -> None:
    ds = load_dataset(image_size=8)
    train, val = ds.split(0.2, seed=3)
    assert (len(train), len(val)) == (4000, 1000)
    again, _ = ds.split(0.2, seed=3)
    np.testing.assert_array_equal(train.images, again.images)
    other, _ = ds.split(0.2, seed=4)
    assert not np.array_equal(train.images, other.images)
    rows = {row.tobytes() + bytes([lab]) for row, lab in zip(ds.images, ds.labels)}
    parts = [
        row.tobytes() + bytes([lab]) for d in (train, val) for row, lab in zip(d.images, d.labels)
    ]
    assert len(parts) == len(ds) and set(parts) == rows
    with pytest.raises(ValueError, match="val_fraction"):
        ds.split(1.0, seed=0)


def test_batch_and_immutability() -> None:
    ds = load_dataset(image_size=8)
    images, labels = ds.batch([0, 4999])
    assert images.shape == (2, 8, 8, 1) and labels.tolist() == [0, 9]
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 0.5


def test_fingerprint_tracks_content() -> None:
    a = load_dataset(image_size=8)
    assert dataset_fingerprint(a) == dataset_fingerprint(load_dataset(image_size=8))
    assert len(dataset_fingerprint(a)) == 16
    assert dataset_fingerprint(a) != dataset_fingerprint(load_dataset(image_size=16))
    assert dataset_fingerprint(a) != dataset_fingerprint(a.subset(range(10)))


# --- folders ---------------------------------------------------------------------------


def test_folder_of_pngs_with_class_subfolders(tmp_path: Path) -> None:
    dark = np.zeros((40, 30), np.uint8)  # portrait: centre-cropped to 30x30
    bright = np.full((20, 20), 255, np.uint8)
    _write_png(tmp_path / "cats" / "a.png", dark)
    _write_png(tmp_path / "cats" / "sub" / "b.png", dark)
    _write_png(tmp_path / "dogs" / "c.PNG", bright)
    ds = load_dataset(tmp_path, image_size=16)
    assert ds.images.shape == (3, 16, 16, 1)
    assert ds.class_names == ("cats", "dogs")
    assert ds.labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(ds.images[:2], -1.0)
    np.testing.assert_allclose(ds.images[2], 1.0)
    assert not ds.builtin


def test_folder_crop_keeps_centre_and_resizes_by_area(tmp_path: Path) -> None:
    # A 4x8 image whose central 4x4 square is a left-dark / right-bright split.
    img = np.zeros((4, 8), np.uint8)
    img[:, 4:6] = 255
    _write_png(tmp_path / "x.png", img)
    ds = load_dataset(tmp_path, image_size=2)
    assert ds.labels is None
    np.testing.assert_allclose(ds.images[0, :, :, 0], [[-1.0, 1.0], [-1.0, 1.0]])


def test_folder_rgb_jpeg_and_channel_conversion(tmp_path: Path) -> None:
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.jpg", quality=95)
    _write_png(tmp_path / "red2.png", rgb)
    ds = load_dataset(tmp_path, image_size=8)
    assert ds.images.shape == (2, 8, 8, 3)
    assert ds.images[..., 0].min() > 0.9 and ds.images[..., 1].max() < -0.9
    grey = load_dataset(tmp_path, image_size=8, channels=1)
    assert grey.channels == 1
    # 0.299 * 255 maps to about -0.4 in [-1, 1].
    np.testing.assert_allclose(grey.images, 0.299 * 2 - 1, atol=0.02)


def test_folder_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "wide.png")
    ds = load_dataset(tmp_path, image_size=8)
    np.testing.assert_allclose(ds.images, 128 / 127.5 - 1, atol=1e-6)


def test_missing_path_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        load_dataset(missing)


def test_empty_folder_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no PNG/JPEG images under .*empty"):
        load_dataset(tmp_path / "empty")


def test_corrupt_image_named(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        load_dataset(tmp_path)


def test_truncated_image_named(tmp_path: Path) -> None:
    good = _write_png(
        tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    )
    (tmp_path / "b.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match="b.png"):
        load_dataset(tmp_path)


def test_mixed_channels_name_both_files(tmp_path: Path) -> None:
    _write_png(tmp_path / "grey.png", np.zeros((8, 8), np.uint8))
    _write_png(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="mixed channel counts") as info:
        load_dataset(tmp_path)
    assert "grey.png" in str(info.value) and "rgb.png" in str(info.value)
    assert load_dataset(tmp_path, image_size=8, channels=3).images.shape == (2, 8, 8, 3)


def test_unsupported_file_named(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2,3")
    with pytest.raises(DatasetError, match="data.csv"):
        load_dataset(path)


# --- npz -------------------------------------------------------------------------------


def test_npz_nhw_uint8_with_labels(tmp_path: Path) -> None:
    images = np.zeros((6, 10, 10), np.uint8)
    images[3:] = 255
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 0, 0, 1, 1, 1], np.uint8))
    ds = load_dataset(tmp_path / "d.npz", image_size=5)
    assert ds.images.shape == (6, 5, 5, 1) and ds.name == "d"
    np.testing.assert_allclose(ds.images[:3], -1.0)
    np.testing.assert_allclose(ds.images[3:], 1.0)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_npz_float_ranges(tmp_path: Path) -> None:
    unit = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    np.savez_compressed(tmp_path / "unit.npz", images=unit)
    np.savez_compressed(tmp_path / "signed.npz", images=unit * 2 - 1)
    a = load_dataset(tmp_path / "unit.npz", image_size=8)
    b = load_dataset(tmp_path / "signed.npz", image_size=8)
    np.testing.assert_allclose(a.images, unit * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(b.images, a.images, atol=1e-6)
    assert a.labels is None


def test_npz_without_images_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 8, 8)))
    with pytest.raises(DatasetError, match="wrong.npz has no 'images'.*pixels"):
        load_dataset(tmp_path / "wrong.npz")


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((2, 8, 8, 5), "1 or 3 channels"),
        ((2, 3, 8, 8), "NCHW"),
        ((8, 8), "NHW or NHWC"),
        ((0, 8, 8), "got"),
    ],
)
def test_npz_bad_shapes_named(tmp_path: Path, shape: tuple[int, ...], pattern: str) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros(shape, np.uint8))
    with pytest.raises(DatasetError, match=f"bad.npz.*{pattern}"):
        load_dataset(tmp_path / "bad.npz")


def test_npz_bad_values_and_labels_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "hot.npz", images=np.full((2, 4, 4), 3.0))
    with pytest.raises(DatasetError, match="hot.npz.*\\[0, 1\\] or \\[-1, 1\\]"):
        load_dataset(tmp_path / "hot.npz")
    np.savez(tmp_path / "lab.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(DatasetError, match="lab.npz.*labels"):
        load_dataset(tmp_path / "lab.npz")


def test_corrupt_npz_named(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DatasetError, match="cannot read .*junk.npz"):
        load_dataset(tmp_path / "junk.npz")


# --- resize ----------------------------------------------------------------------------


def test_resize_images_oracles() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((2, 12, 12, 3)).astype(np.float32)
    # Integer-factor shrink is exactly a block mean.
    blocks = x.reshape(2, 4, 3, 4, 3, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_images(x, 4), blocks, atol=1e-6)
    # Enlarging interpolates, so a constant image stays constant and the range is kept.
    up = resize_images(np.full((1, 3, 3, 1), 0.25, np.float32), 10)
    np.testing.assert_allclose(up, 0.25, atol=1e-6)
    big = resize_images(x, 20)
    assert big.min() >= x.min() - 1e-6 and big.max() <= x.max() + 1e-6


def test_dataset_is_picklable() -> None:
    import pickle

    ds = load_dataset(image_size=8).subset(range(5))
    back = pickle.loads(pickle.dumps(ds))
    assert isinstance(back, Dataset)
    np.testing.assert_array_equal(back.images, ds.images)
