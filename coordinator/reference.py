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

from coordinator import sum_kernels
from protos.buffers import ReusableBuffers

# Elements per block of the mean's pass (1 MiB of float32): each block of the sum is divided into the mean
# and squared while it is in cache.
_MEAN_BLOCK = 1 << 18


def _numpy_has(*tensors: Tensor) -> bool:
    """numpy can work on these tensors' memory (CPU, a dtype numpy has: not bfloat16)."""
    return all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors)


def count_nonfinite(t: Tensor) -> int:
    """How many values of a float tensor are NaN or Inf: one pass over their bits (sum_kernels.py)."""
    flat = t.detach().reshape(-1)
    if _numpy_has(flat):
        return sum_kernels.count_nonfinite(flat.numpy())
    return int((~torch.isfinite(flat)).sum())


def _squared_norm(flat: Tensor) -> float:
    return float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2


class SyncMean:
    """xbar_next = mean of the reported coupled averages, plus their spread around it. Reports must be finite
    (the job checks them before they get here).

    The float64 sum's buffer is kept after ``finish`` and reused by the next round (``reset``), and the mean
    is written into a buffer of ``ReusableBuffers`` that no earlier round's holder uses any more: a fresh
    model-sized allocation every round costs page faults comparable to moving the bytes. Each pass over a
    report also squares it (sum_kernels.py), for the spread.

    A *donated* first report (the caller hands its memory over and never writes it again, e.g. a buffer just
    received from the network) is kept as it is, not copied: if it stays the round's only report it is the
    mean itself (x / 1 is x, so bit for bit what the division would give); the second report is added to it
    into the float64 sum in one pass, where copying the first would have cost a pass of its own."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._first: Tensor | None = None  # a donated first report, not yet added into ``_sum``
        self._spare: Tensor | None = None
        self._sq_norms = 0.0
        self._dtype = torch.float32
        self._means = ReusableBuffers()  # each round's mean is written into memory a finished round let go of
        self.count = 0

    def reset(self) -> None:
        """Start a new round, keeping the sum's buffer."""
        if self._sum is not None:
            self._spare = self._sum
        self._sum, self._first, self._sq_norms, self.count = None, None, 0.0, 0

    def add(self, mu: Tensor, *, donated: bool = False) -> None:
        """Add ``mu`` (``donated``: the caller gives up ``mu``'s memory, which may then be kept). The float32 ->
        float64 widening happens inside the add, so no float64 copy of ``mu`` is made."""
        flat = mu.detach().reshape(-1)
        if self.count == 0:
            self._dtype = mu.dtype
            if donated:
                self._first = flat  # squared only if a second report comes
            else:
                self._sum = self._sum_buffer(flat.numel())
                self._sq_norms += self._into_sum(self._sum, flat, add=False)
        elif self._first is not None:
            first, self._first = self._first, None
            self._sum = self._sum_buffer(flat.numel())
            self._sq_norms += sum(self._add_pair(self._sum, first, flat))
        else:
            assert self._sum is not None
            self._sq_norms += self._into_sum(self._sum, flat, add=True)
        self.count += 1

    @staticmethod
    def _into_sum(total: Tensor, flat: Tensor, *, add: bool) -> float:
        """``total += flat`` (``add``) or ``total[:] = flat``; returns ||flat||^2."""
        if _numpy_has(total, flat):
            into = sum_kernels.add if add else sum_kernels.copy
            return into(total.numpy(), flat.numpy())
        if add:
            total.add_(flat)
        else:
            total.copy_(flat)
        return _squared_norm(flat)

    @staticmethod
    def _add_pair(total: Tensor, first: Tensor, flat: Tensor) -> tuple[float, float]:
        if _numpy_has(total, first, flat):
            return sum_kernels.add_pair(total.numpy(), first.numpy(), flat.numpy())
        total.copy_(first).add_(flat)
        return _squared_norm(first), _squared_norm(flat)

    def _sum_buffer(self, numel: int) -> Tensor:
        spare, self._spare = self._spare, None
        if spare is not None and spare.numel() == numel:
            return spare
        return torch.empty(numel, dtype=torch.float64)

    def finish(self) -> tuple[Tensor, float]:
        """The mean (in the reports' dtype) and the consensus distance: the RMS distance of the coupled
        averages to their mean, sqrt(mean ||mu_a||^2 - ||mean||^2). Consumes the sum (``reset`` reuses its
        buffer)."""
        if self.count == 0:
            raise ValueError("no coupled averages were reported for this round")
        if self._first is not None:  # one donated report: it is the mean, at distance 0 from itself
            mean, self._first = self._first, None
            return mean, 0.0
        assert self._sum is not None
        total, count = self._sum, self.count
        mean = self._means.take(total.numel(), self._dtype)
        if not _numpy_has(mean):
            torch.div(total, count, out=mean)
            total_sq = _squared_norm(total)
        else:  # each block of the sum is divided into the narrower mean and squared while in cache
            t, m, total_sq = total.numpy(), mean.numpy(), 0.0
            for i in range(0, t.size, _MEAN_BLOCK):
                block = t[i : i + _MEAN_BLOCK]
                sum_kernels.divide(block, count, m[i : i + _MEAN_BLOCK])
                total_sq += float(np.dot(block, block))  # float64 BLAS: a seventh of the divide's time
        spread = self._sq_norms / count - total_sq / count**2
        self._spare, self._sum = total, None
        return mean, max(spread, 0.0) ** 0.5


def easgd_center_step_(center: Tensor, x: Tensor, alpha: float) -> Tensor:
    """Async (EASGD): ``diff = alpha (x - center); center += diff``. Returns the center as it was before, which
    the worker needs to apply the same force to itself (``x -= diff``)."""
    before = center.clone()
    center.lerp_(x.reshape(-1).to(center.dtype), alpha)
    return before
