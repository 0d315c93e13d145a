"""Datasets as whole in-memory tensors: Fashion-MNIST, MNIST (IDX files), CIFAR-10 (python batches)
and a deterministic synthetic set for tests and demos.

Images are float32 N x C x H x W, normalised with per-dataset mean/std; labels are int64. Decoding is
vectorised (numpy/torch, no per-sample Python) and cached per process, so several replicas in one
process share one copy: consumers must treat the tensors as read-only.
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protos.spec import DataSpec
from worker.workloads.errors import WorkloadError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Per-channel mean/std of the training split (pixel values in [0, 1]).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"
_SYNTHETIC_AMPLITUDE = 0.3


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split held as tensors. Shared between replicas: do not mutate."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device`` (the same object's tensors if already there)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


_cache: dict[tuple[str, str, int, int], Dataset] = {}
_cache_lock = threading.Lock()


def load_dataset(spec: DataSpec, seed: int = 0) -> Dataset:
    """The dataset named by ``spec.name`` (on CPU), decoded once per process and then shared.

    ``seed`` only matters for ``synthetic``. Raises ``WorkloadError`` naming ``data.root`` or the bad
    file when the data is missing or malformed."""
    root = _root_for(spec)
    synthetic = spec.name == "synthetic"
    key = (spec.name, str(root), seed if synthetic else 0, spec.synthetic_size if synthetic else 0)
    # One lock for all keys: decoding twice would only waste time, but replicas starting together
    # would otherwise all decode 60k images at once.
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None:
            cached = _load_uncached(spec.name, root, seed, spec.synthetic_size)
            _cache[key] = cached
    return cached


def clear_cache() -> None:
    """Forget decoded datasets (tests; freeing memory after a job)."""
    with _cache_lock:
        _cache.clear()


def _root_for(spec: DataSpec) -> Path:
    if spec.root is not None:
        return Path(spec.root).expanduser().resolve()
    if spec.name == "fashion-mnist":
        return FASHION_MNIST_ROOT
    if spec.name == "synthetic":
        return Path()
    raise WorkloadError(f"data.root: dataset {spec.name} needs a directory")


def _load_uncached(name: str, root: Path, seed: int, synthetic_size: int) -> Dataset:
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, root)
    if name == "cifar10":
        return _load_cifar10(root)
    if name == "synthetic":
        return make_synthetic(synthetic_size, seed)
    raise WorkloadError(f"data.name: unknown dataset {name!r}; allowed: fashion-mnist, mnist, cifar10, synthetic")


def _normalise(images: np.ndarray, name: str) -> torch.Tensor:
    mean, std = _STATS[name]
    # astype copies into a writable array (frombuffer's view of the file bytes is read-only).
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    channels = x.shape[1]
    x.sub_(torch.tensor(mean).view(1, channels, 1, 1)).div_(torch.tensor(std).view(1, channels, 1, 1))
    return x


def _labels(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.int64))


# ---------------------------------------------------------------------------------------------- IDX


def _idx_needs(name: str) -> str:
    files = ", ".join(f"{base}[.gz]" for base in _IDX_FILES.values())
    return f"{name} needs {files}"


def _find_idx_file(root: Path, base: str, name: str) -> Path:
    # Also accept torchvision's layout (root/MNIST/raw, root/FashionMNIST/raw).
    for directory in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for candidate in (directory / f"{base}.gz", directory / base):
            if candidate.is_file():
                return candidate
    raise WorkloadError(f"data.root: {root}: missing {base}[.gz] ({_idx_needs(name)})")


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes as an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise WorkloadError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4:
        raise WorkloadError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise WorkloadError(f"{path}: bad IDX magic {magic} (expected {expect_magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise WorkloadError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise WorkloadError(f"{path}: truncated IDX file: header says {size} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)


def _load_idx_split(root: Path, name: str, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(root, _IDX_FILES[images_key], name)
    labels_path = _find_idx_file(root, _IDX_FILES[labels_key], name)
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise WorkloadError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images, labels


def _load_idx_dataset(name: str, root: Path) -> Dataset:
    if not root.is_dir():
        raise WorkloadError(f"data.root: {root}: no such directory ({_idx_needs(name)})")
    train_images, train_labels = _load_idx_split(root, name, "train_x", "train_y")
    test_images, test_labels = _load_idx_split(root, name, "test_x", "test_y")
    train_x = _normalise(train_images[:, None], name)
    return Dataset(
        train_x=train_x,
        train_y=_labels(train_labels),
        test_x=_normalise(test_images[:, None], name),
        test_y=_labels(test_labels),
        num_classes=10,
        input_shape=(1, int(train_x.shape[2]), int(train_x.shape[3])),
        name=name,
    )


# ------------------------------------------------------------------------------------------ CIFAR-10


def _cifar_dir(root: Path) -> Path:
    needs = f"cifar10 needs {', '.join([*_CIFAR_TRAIN, _CIFAR_TEST])}"
    if not root.is_dir():
        raise WorkloadError(f"data.root: {root}: no such directory ({needs})")
    for directory in (root, root / "cifar-10-batches-py"):
        if (directory / _CIFAR_TEST).is_file():
            return directory
    raise WorkloadError(f"data.root: {root}: missing {_CIFAR_TEST} ({needs})")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise WorkloadError(f"data.root: {path}: no such file (a CIFAR-10 python batch)")
    try:
        with path.open("rb") as f:
            # Local files in the standard CIFAR-10 python format, which is a pickle.
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:
        raise WorkloadError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise WorkloadError(f"{path}: expected N x 3072 data and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path) -> Dataset:
    directory = _cifar_dir(root)
    parts = [_read_cifar_batch(directory / name) for name in _CIFAR_TRAIN]
    test_images, test_labels = _read_cifar_batch(directory / _CIFAR_TEST)
    return Dataset(
        train_x=_normalise(np.concatenate([p[0] for p in parts]), "cifar10"),
        train_y=torch.from_numpy(np.concatenate([p[1] for p in parts])),
        test_x=_normalise(test_images, "cifar10"),
        test_y=torch.from_numpy(test_labels),
        num_classes=10,
        input_shape=(3, 32, 32),
        name="cifar10",
    )


# ----------------------------------------------------------------------------------------- synthetic


def make_synthetic(train_size: int, seed: int, num_classes: int = 10) -> Dataset:
    """``train_size`` training and ``train_size // 4`` test 1x28x28 images: a smooth random pattern per
    class (scaled by 0.3) plus unit Gaussian noise. A small MLP or LeNet drops far below chance error
    within tens of steps; spatially smooth so convolutions have something to find."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 1, 7, 7, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    # Amplitude 0.3 against unit noise: a 784-32-10 MLP is at ~4% test error after 20 SGD steps and
    # ~1% after 300, so the set is learnable at once yet still separates better from worse optimizers.
    patterns = patterns * _SYNTHETIC_AMPLITUDE
    test_size = max(1, train_size // 4)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=gen, dtype=torch.int64)
        noise = torch.randn(n, 1, 28, 28, generator=gen)
        return patterns[labels] + noise, labels

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return Dataset(train_x, train_y, test_x, test_y, num_classes, (1, 28, 28), "synthetic")
