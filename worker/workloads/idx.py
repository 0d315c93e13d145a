"""IDX directories (MNIST, Fashion-MNIST and any data set in that format): the four files
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
each optionally gzip-compressed. Decoding is one ``np.frombuffer`` per file."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from worker.workloads.errors import WorkloadError, one_line
from worker.workloads.prepare import Chunk, Splits

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


def _needs(name: str) -> str:
    return f"{name} needs {', '.join(f'{base}[.gz]' for base in IDX_FILES.values())}"


def _find(root: Path, base: str, name: str) -> Path:
    # Also accept torchvision's layout (root/MNIST/raw, root/FashionMNIST/raw).
    for directory in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for candidate in (directory / f"{base}.gz", directory / base):
            if candidate.is_file():
                return candidate
    raise WorkloadError(f"data.root: {root}: missing {base}[.gz] ({_needs(name)})")


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes as a read-only array of its declared
    shape. Raises ``WorkloadError`` naming ``path`` on a bad magic number or a truncated file."""
    try:
        data = path.read_bytes()
        raw = gzip.decompress(data) if path.suffix == ".gz" else data
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise WorkloadError(f"{path}: truncated or corrupt gzip file ({one_line(err)})") from err
    except OSError as err:
        raise WorkloadError(f"{path}: cannot read IDX file ({one_line(err)})") from err
    if len(raw) < 4:
        raise WorkloadError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise WorkloadError(f"{path}: bad IDX magic {magic} (expected {expect_magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise WorkloadError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(shape)
    found = len(raw) - header
    if found < size:
        raise WorkloadError(f"{path}: truncated IDX file: header says {size} bytes of data, found {found}")
    if found > size:
        raise WorkloadError(f"{path}: IDX file has {found - size} bytes after the {size} its header declares")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)


def _split(root: Path, name: str, images_key: str, labels_key: str) -> Chunk:
    images_path = _find(root, IDX_FILES[images_key], name)
    labels_path = _find(root, IDX_FILES[labels_key], name)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    return Chunk(images, labels, str(images_path), str(labels_path))


def load_idx(root: Path, name: str) -> Splits:
    """The IDX directory ``root`` (``name`` only appears in messages)."""
    if not root.is_dir():
        raise WorkloadError(f"data.root: {root}: no such directory ({_needs(name)})")
    return Splits(
        train=[_split(root, name, "train_x", "train_y")],
        test=[_split(root, name, "test_x", "test_y")],
    )
