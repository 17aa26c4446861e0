"""Sample grids as small inline images, so a report with a dozen of them still mails."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

MAX_SIDE = 256  # px: a 16 px digit grid of 8x8 stays full size; larger grids shrink


def thumbnail(path: Path, max_side: int = MAX_SIDE) -> str:
    """``path`` (a PNG sample grid) re-encoded as a ``data:image/webp`` URL.

    Args:
        path: an image file Pillow can read.
        max_side: the longest side of the result, in pixels (never enlarged).

    Returns:
        A ``data:`` URL holding a lossless WebP (digit grids compress best losslessly).

    Raises:
        OSError: the file is missing or not an image.
    """
    with Image.open(path) as image:
        image.load()
        small = image.convert("L" if image.mode in ("L", "LA", "1", "P") else "RGB")
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", lossless=True, method=6)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
