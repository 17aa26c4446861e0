"""Image grids: MLX/numpy batches in [-1, 1] to PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) floats in [-1, 1] to uint8 in [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows*(H+pad)+pad, ...) uint8 array."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[i]
    return out


def save_grid(images: np.ndarray, target: str | Path | io.BytesIO, nrow: int | None = None,
              scale: int = 2) -> None:
    """Write a PNG grid of ``images`` to a path or a binary buffer."""
    tile = grid(images, nrow)
    mode = "L" if tile.shape[-1] == 1 else "RGB"
    img = Image.fromarray(tile[..., 0] if mode == "L" else tile[..., :3], mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(target, format="PNG")


def grid_png(images: np.ndarray, nrow: int | None = None) -> bytes:
    """The PNG grid as bytes, for shipping across processes."""
    buf = io.BytesIO()
    save_grid(images, buf, nrow)
    return buf.getvalue()
