"""The center's update rules (docs/algorithm.md), streaming: memory grows with the model, not
with the number of workers.

``SyncMean`` keeps a float64 running sum as reports arrive, so the mean does not depend on the order
in which workers report (float32 inputs add exactly in float64 for weights of similar magnitude) and
resumed runs reproduce uninterrupted ones bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Elements per block of ``squared_norm``: 1 MiB of float32, so few enough torch calls that a Python thread
# busy elsewhere (each call gives up and retakes the GIL) costs little, and small enough to stay in cache.
# The data channel checks each block as it arrives, in the same order, so both transports compute the
# same consensus distance. (BLAS ``dot`` is avoided: its thread team stalls badly on a loaded machine.)
SQ_NORM_BLOCK = 1 << 18


def squared_norm(t: Tensor) -> float:
    """||t||^2 in float64, block by block; NaN or Inf when ``t`` holds a non-finite value (float32/16
    squares cannot overflow float64, so for them the sum is finite exactly when every value is). One pass
    over ``t`` doubles as the finite check."""
    flat = t.detach().reshape(-1)
    return sum(block_squared_norm(flat[i : i + SQ_NORM_BLOCK]) for i in range(0, flat.numel(), SQ_NORM_BLOCK))


def block_squared_norm(block: Tensor) -> float:
    """||block||^2 accumulated in float64, in the calling thread: numpy (one pass in cache, no thread team
    to wake for each block, which on a busy machine costs more than the arithmetic); torch for bfloat16."""
    if block.dtype == torch.bfloat16 or block.device.type != "cpu":
        return float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    wide = np.square(block.numpy(), dtype=np.float64)
    return float(np.add.reduce(wide))


class SyncMean:
    """xbar_next = mean of the reported coupled averages, plus their spread around it.

    The float64 sum's buffer is kept after ``finish`` and reused by the next round (``reset``): a fresh
    model-sized allocation every round costs page faults comparable to moving the bytes."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._spare: Tensor | None = None
        self._sq_norms = 0.0
        self._dtype = torch.float32
        self.count = 0

    def reset(self) -> None:
        """Start a new round, keeping the sum's buffer."""
        if self._sum is not None:
            self._spare = self._sum
        self._sum, self._sq_norms, self.count = None, 0.0, 0

    def add(self, mu: Tensor, sq_norm: float | None = None) -> None:
        """Add ``mu`` (``sq_norm``: its ``squared_norm`` when the caller has it already). The float32 ->
        float64 widening happens inside the add, so no float64 copy of ``mu`` is made."""
        flat = mu.detach().reshape(-1)
        if self._sum is None:
            spare, self._spare = self._spare, None
            fits = spare is not None and spare.numel() == flat.numel()
            self._sum = spare.copy_(flat) if spare is not None and fits else flat.to(torch.float64, copy=True)
            self._dtype = mu.dtype
        else:
            self._sum.add_(flat)  # float32 -> float64 inside the kernel
        self._sq_norms += squared_norm(flat) if sq_norm is None else sq_norm
        self.count += 1

    def finish(self) -> tuple[Tensor, float]:
        """The mean (in the reports' dtype) and the consensus distance: the RMS distance of the coupled
        averages to their mean, sqrt(mean ||mu_a||^2 - ||mean||^2). Consumes the sum (``reset`` reuses its
        buffer)."""
        if self._sum is None or self.count == 0:
            raise ValueError("no coupled averages were reported for this round")
        total = self._sum.div_(self.count)
        mean, mean_sq = total.to(self._dtype), squared_norm(total)
        spread = self._sq_norms / self.count - mean_sq
        self._spare, self._sum = total, None
        return mean, max(spread, 0.0) ** 0.5


def easgd_center_step_(center: Tensor, x: Tensor, alpha: float) -> Tensor:
    """Async (EASGD): ``diff = alpha (x - center); center += diff``. Returns the center as it was before, which
    the worker needs to apply the same force to itself (``x -= diff``)."""
    before = center.clone()
    center.lerp_(x.reshape(-1).to(center.dtype), alpha)
    return before
