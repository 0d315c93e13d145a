"""From decoded arrays to training tensors: validation with one-line errors, ``train_limit``, and
normalisation. Shared by every data-set format.

Each format's reader returns ``Splits``: for train and test, one or more ``Chunk``s (a file's images and
labels, numpy arrays) with the place they came from, so that every error names the file (or
``data.name``) and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.workloads.errors import WorkloadError

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Elements per block when computing statistics in float64 (32 MiB blocks).
_STATS_BLOCK = 1 << 22


@dataclass(frozen=True)
class Chunk:
    """Images (N,H,W) or (N,C,H,W), uint8 or float, and N integer labels, with where each came from
    (a path, ``"<file>: x"``, ``"data.name: pkg.mod:fn: train_x"``): the start of its error messages."""

    x: np.ndarray
    y: np.ndarray
    x_where: str
    y_where: str


@dataclass(frozen=True)
class Splits:
    train: Sequence[Chunk]
    test: Sequence[Chunk]


@dataclass(frozen=True)
class Prepared:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]


def prepare(splits: Splits, stats: Stats | None, num_classes: int | None, train_limit: int | None) -> Prepared:
    """Validate every chunk, concatenate, keep the first ``train_limit`` training samples, and return
    float32 N x C x H x W inputs normalised with ``stats`` (per-channel mean and std of inputs in
    [0, 1]) or, when None, with the kept training set's own per-channel statistics; int64 labels.

    ``num_classes`` None: largest label + 1 over both splits. Raises ``WorkloadError``."""
    train = [_checked(chunk) for chunk in splits.train]
    test = [_checked(chunk) for chunk in splits.test]
    if not train or sum(len(c.x) for c in train) == 0:
        where = train[0].x_where if train else "data"
        raise WorkloadError(f"{where}: the training set is empty")
    if not test or sum(len(c.x) for c in test) == 0:
        where = test[0].x_where if test else "data"
        raise WorkloadError(f"{where}: the test set is empty")
    shape = tuple(int(d) for d in train[0].x.shape[1:])
    for chunk in [*train, *test]:
        if tuple(chunk.x.shape[1:]) != shape:
            got = "x".join(map(str, chunk.x.shape[1:]))
            raise WorkloadError(
                f"{chunk.x_where}: images are {got} (C x H x W), but {train[0].x_where} has {'x'.join(map(str, shape))}"
            )
    if num_classes is None:
        num_classes = max(int(c.y.max()) for c in [*train, *test] if len(c.y)) + 1
        num_classes = max(num_classes, 1)
    for chunk in [*train, *test]:
        _check_label_range(chunk, num_classes)

    train_x = _concat([c.x for c in train])
    train_y = _concat([c.y for c in train])
    if train_limit is not None:
        if train_limit > len(train_x):
            raise WorkloadError(
                f"data.train_limit: {train_limit} is larger than the training set "
                f"({len(train_x)} samples in {train[0].x_where})"
            )
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    x_train = _to_float(train_x)
    x_test = _to_float(_concat([c.x for c in test]))
    mean, std = channel_stats(x_train) if stats is None else (torch.tensor(stats[0]), torch.tensor(stats[1]))
    if len(mean) != x_train.shape[1]:
        raise WorkloadError(f"{train[0].x_where}: {x_train.shape[1]} channel(s), expected {len(mean)}")
    for x in (x_train, x_test):
        x.sub_(mean.view(1, -1, 1, 1).float()).div_(std.view(1, -1, 1, 1).float())
    c, h, w = shape
    return Prepared(
        train_x=x_train,
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=x_test,
        test_y=torch.from_numpy(_concat([c.y for c in test]).astype(np.int64)),
        num_classes=num_classes,
        input_shape=(c, h, w),
    )


def _checked(chunk: Chunk) -> Chunk:
    """The chunk with images as (N,C,H,W); raises on rank, dtype, count or non-finite values."""
    x, y = chunk.x, chunk.y
    if not isinstance(x, np.ndarray) or (x.dtype != np.uint8 and x.dtype.kind != "f"):
        dtype = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise WorkloadError(f"{chunk.x_where}: images of dtype {dtype}, expected uint8 or float")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise WorkloadError(f"{chunk.x_where}: images of shape {x.shape}, expected (N, H, W) or (N, C, H, W)")
    if min(x.shape[1:]) == 0:
        raise WorkloadError(f"{chunk.x_where}: images of shape {x.shape} have an empty dimension")
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu":
        dtype = y.dtype if isinstance(y, np.ndarray) else type(y).__name__
        raise WorkloadError(f"{chunk.y_where}: labels of dtype {dtype}, expected integers")
    if y.ndim != 1:
        raise WorkloadError(f"{chunk.y_where}: labels of shape {y.shape}, expected (N,)")
    if len(x) != len(y):
        if chunk.x_where == chunk.y_where:
            raise WorkloadError(f"{chunk.x_where}: {len(y)} labels for {len(x)} images")
        raise WorkloadError(f"{chunk.y_where}: {len(y)} labels for {len(x)} images in {chunk.x_where}")
    if x.dtype.kind == "f" and len(x):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            bad = int((~finite).sum())
            raise WorkloadError(
                f"{chunk.x_where}: non-finite values (nan or inf) in {bad} image(s), the first is image {first}"
            )
    return Chunk(x, y, chunk.x_where, chunk.y_where)


def _check_label_range(chunk: Chunk, num_classes: int) -> None:
    if not len(chunk.y):
        return
    low, high = int(chunk.y.min()), int(chunk.y.max())
    bad = low if low < 0 else high if high >= num_classes else None
    if bad is not None:
        index = int(np.flatnonzero(chunk.y == bad)[0])
        raise WorkloadError(
            f"{chunk.y_where}: label {bad} (sample {index}) out of range for {num_classes} classes "
            f"(labels must be 0..{num_classes - 1}; see data.num_classes)"
        )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _to_float(x: np.ndarray) -> torch.Tensor:
    """A float32 copy (never a view of the caller's array); uint8 scaled to [0, 1]."""
    out = torch.from_numpy(x.astype(np.float32))
    if x.dtype == np.uint8:
        out.div_(255.0)
    return out


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of N x C x H x W ``x``, accumulated in float64 over blocks
    of samples; a constant channel gets std 1."""
    channels = x.shape[1]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    rows = max(1, _STATS_BLOCK // max(1, x[0].numel()))
    total = torch.zeros(channels, dtype=torch.float64)
    for block in x.split(rows):
        total += block.sum(dim=(0, 2, 3), dtype=torch.float64)
    mean = total / count
    squares = torch.zeros(channels, dtype=torch.float64)
    for block in x.split(rows):
        squares += (block.double() - mean.view(1, -1, 1, 1)).square_().sum(dim=(0, 2, 3))
    std = (squares / count).sqrt()
    std[std < 1e-12] = 1.0
    return mean, std
