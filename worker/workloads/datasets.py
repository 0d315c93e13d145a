"""Datasets as whole in-memory tensors, of any size: Fashion-MNIST and MNIST (IDX files), any IDX
directory, CIFAR-10/100 (python batches), npz files, a user's ``package.module:callable``, and a
deterministic synthetic set for tests and demos.

Images are float32 N x C x H x W; labels are int64. Fashion-MNIST, MNIST and CIFAR-10 are normalised
with their published per-channel mean/std; idx, npz, cifar100 and callables with the per-channel mean/std
of the (kept) training set, after scaling uint8 inputs to [0, 1]. The training-set size is whatever the
data holds (``data.train_limit`` keeps its first N samples). Decoding is vectorised (numpy/torch, no
per-sample Python except for a callable's torch Datasets) and cached per process, so several replicas in
one process share one copy: consumers must treat the tensors as read-only.

Format readers live in ``idx``, ``cifar`` and ``userdata``; validation and normalisation in ``prepare``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from protos.spec import DATASETS, DATASETS_WITH_ROOT, DataSpec
from worker.workloads.cifar import load_cifar10, load_cifar100
from worker.workloads.errors import WorkloadError
from worker.workloads.idx import load_idx
from worker.workloads.prepare import Splits, Stats, prepare
from worker.workloads.userdata import load_callable, load_npz

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Published per-channel mean/std of the training split (pixel values in [0, 1]).
_STATS: dict[str, Stats] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Classes when data.num_classes is null (other sets: largest label + 1).
_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}
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

    @property
    def train_size(self) -> int:
        """Training samples (after ``data.train_limit``): what a data pass covers."""
        return int(self.train_x.shape[0])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device`` (the same object's tensors if already there)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


_cache: dict[tuple[object, ...], Dataset] = {}
_cache_lock = threading.Lock()


def cache_key(spec: DataSpec, seed: int = 0) -> tuple[object, ...]:
    """Every field that changes what ``load_dataset`` returns (``seed`` only for ``synthetic``)."""
    synthetic = spec.name == "synthetic"
    return (
        spec.name,
        str(_root_for(spec)),
        json.dumps(spec.options, sort_keys=True, default=repr),
        spec.train_limit,
        spec.num_classes,
        seed if synthetic else 0,
        spec.synthetic_size if synthetic else 0,
    )


def load_dataset(spec: DataSpec, seed: int = 0) -> Dataset:
    """The data set ``spec`` describes (on CPU), decoded once per process and then shared.

    ``seed`` only matters for ``synthetic``. Raises ``WorkloadError`` (one line naming ``data.*`` or the
    bad file, and the problem) when the data is missing or malformed."""
    _check_options(spec)
    key = cache_key(spec, seed)
    # One lock for all keys: decoding twice would only waste time, but replicas starting together
    # would otherwise all decode the same files at once.
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None:
            cached = _load_uncached(spec, seed)
            _cache[key] = cached
    return cached


def clear_cache() -> None:
    """Forget decoded datasets (tests; freeing memory after a job)."""
    with _cache_lock:
        _cache.clear()


def _check_options(spec: DataSpec) -> None:
    if spec.options and spec.name in DATASETS:
        raise WorkloadError(
            f"data.options: dataset {spec.name} takes no options (got {', '.join(map(str, spec.options))}); "
            "options are keyword arguments of a package.module:callable data set"
        )


def _root_for(spec: DataSpec) -> Path | None:
    if spec.root is not None:
        return Path(spec.root).expanduser().resolve()
    if spec.name == "fashion-mnist":
        return FASHION_MNIST_ROOT
    if spec.name in DATASETS_WITH_ROOT:
        raise WorkloadError(f"data.root: dataset {spec.name} needs a directory")
    return None


def _load_uncached(spec: DataSpec, seed: int) -> Dataset:
    name = spec.name
    if name == "synthetic":
        data = make_synthetic(spec.synthetic_size, seed, spec.num_classes or _CLASSES["synthetic"])
        return _limited(data, spec.train_limit)
    root = _root_for(spec)
    splits: Splits
    if name in ("mnist", "fashion-mnist", "idx"):
        assert root is not None
        splits = load_idx(root, name)
    elif name == "cifar10":
        assert root is not None
        splits = load_cifar10(root)
    elif name == "cifar100":
        assert root is not None
        splits = load_cifar100(root)
    elif name == "npz":
        assert root is not None
        splits = load_npz(root)
    elif ":" in name:
        splits = load_callable(name, spec.options)
    else:
        allowed = ", ".join(DATASETS)
        raise WorkloadError(f"data.name: unknown dataset {name!r}; allowed: {allowed} or package.module:callable")
    num_classes = spec.num_classes if spec.num_classes is not None else _CLASSES.get(name)
    ready = prepare(splits, _STATS.get(name), num_classes, spec.train_limit)
    return Dataset(ready.train_x, ready.train_y, ready.test_x, ready.test_y, ready.num_classes, ready.input_shape, name)


def _limited(data: Dataset, train_limit: int | None) -> Dataset:
    if train_limit is None:
        return data
    if train_limit > data.train_size:
        raise WorkloadError(
            f"data.train_limit: {train_limit} is larger than the training set ({data.train_size} samples)"
        )
    return dataclasses.replace(data, train_x=data.train_x[:train_limit], train_y=data.train_y[:train_limit])


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
