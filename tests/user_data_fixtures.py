"""User data-set callables for tests/test_user_data.py (``data.name: tests.user_data_fixtures:<fn>``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


def arrays(n_train: int = 40, n_test: int = 10, classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four tensors: 1x6x5 float images and labels 0..classes-1 (every class present in train)."""
    gen = torch.Generator().manual_seed(seed)
    train_y = torch.arange(n_train) % classes
    test_y = torch.randint(0, classes, (n_test,), generator=gen)
    return {
        "train_x": torch.randn(n_train, 1, 6, 5, generator=gen) * 3 + 2,
        "train_y": train_y,
        "test_x": torch.randn(n_test, 1, 6, 5, generator=gen),
        "test_y": test_y,
    }


def make(kind: str = "tensors", **options: Any) -> object:
    """``kind``: tensors (a 4-tuple), dict, numpy (a 4-tuple of arrays) or datasets (a pair of
    map-style torch Datasets); other keyword arguments go to ``arrays``."""
    data = arrays(**options)
    if kind == "dict":
        return data
    if kind == "numpy":
        return tuple(value.numpy() for value in data.values())
    if kind == "datasets":
        return _Pairs(data["train_x"], data["train_y"]), TensorDataset(data["test_x"], data["test_y"])
    return data["train_x"], data["train_y"], data["test_x"], data["test_y"]


class _Pairs(Dataset[tuple[np.ndarray, int]]):
    """A plain map-style dataset whose items are (numpy image, python int)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.x[index].numpy(), int(self.y[index])


def with_nan() -> dict[str, torch.Tensor]:
    data = arrays()
    data["train_x"][7, 0, 2, 3] = float("inf")
    return data


def mismatched() -> tuple[torch.Tensor, ...]:
    data = arrays()
    return data["train_x"], data["train_y"][:-1], data["test_x"], data["test_y"]


def flat_images() -> tuple[torch.Tensor, ...]:
    data = arrays()
    return data["train_x"].flatten(1), data["train_y"], data["test_x"], data["test_y"]


def float_labels() -> tuple[torch.Tensor, ...]:
    data = arrays()
    return data["train_x"], data["train_y"].float(), data["test_x"], data["test_y"]


def empty_test() -> tuple[torch.Tensor, ...]:
    data = arrays()
    return data["train_x"], data["train_y"], data["test_x"][:0], data["test_y"][:0]


def three_things() -> tuple[int, int, int]:
    return 1, 2, 3


def bad_item() -> tuple[object, object]:
    data = arrays()
    return [(data["train_x"][0], 0, "extra")], TensorDataset(data["test_x"], data["test_y"])


def broken() -> None:
    raise RuntimeError("disk on fire\nsecond line")


NOT_CALLABLE = 3
