"""Small user models for tests, loaded through the ``package.module:callable`` model path."""

from __future__ import annotations

import time

import torch
from torch import nn

# What a worker process needs to run these models: workers run no user code they are not told to.
TOY_CODE = ("--allow-code", "toy_models")


def mlp(num_classes: int, input_shape: tuple[int, int, int], hidden: int = 32, dropout: float = 0.0) -> nn.Module:
    features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class _NanAfter(nn.Module):
    """Produces NaN logits from the ``after``-th training forward on: a loss that blows up on cue."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def nan_after(num_classes: int, input_shape: tuple[int, int, int], after: int = 10) -> nn.Module:
    return _NanAfter(mlp(num_classes, input_shape), after)


class _Slow(nn.Module):
    """Sleeps in every training forward: stretches a run so a test can kill it mid-way."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay > 0:
            time.sleep(self.delay)
        return self.inner(x)


def slow_mlp(
    num_classes: int, input_shape: tuple[int, int, int], delay: float = 0.0, dropout: float = 0.2
) -> nn.Module:
    return _Slow(mlp(num_classes, input_shape, dropout=dropout), delay)
