"""The center's update rules (docs/algorithm.md), streaming: memory grows with the model, not
with the number of workers.

``SyncMean`` keeps a float64 running sum as reports arrive, so the mean does not depend on the order
in which workers report (float32 inputs add exactly in float64 for weights of similar magnitude) and
resumed runs reproduce uninterrupted ones bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from protos.buffers import ReusableBuffers

# Elements per block of ``squared_norm`` (1 MiB of float32). The norm is the sum of the blocks' norms in
# order, so the data channel, which checks the blocks as they arrive, computes the same value as gRPC's path.
SQ_NORM_BLOCK = 1 << 18
# Blocks per numpy call: few calls (each gives up and retakes the GIL, which on a busy machine means
# waiting for a core).
_BLOCKS_PER_CALL = 8


def squared_norm(t: Tensor) -> float:
    """||t||^2 in float64; NaN or Inf when ``t`` holds a non-finite value (float32/16 squares cannot overflow
    float64, so for them the sum is finite exactly when every value is): one pass that is also the finite
    check."""
    return sum(block_squared_norms(t.detach().reshape(-1)))


def block_squared_norms(flat: Tensor) -> list[float]:
    """||block||^2 of each ``SQ_NORM_BLOCK``-element block of a flat CPU tensor, accumulated in float64, in
    the calling thread: numpy, whose loops need no thread team (on a loaded machine, waking one for every
    block costs more than the arithmetic); torch for bfloat16, which numpy lacks."""
    if flat.dtype == torch.bfloat16 or flat.device.type != "cpu":
        return [
            float(torch.linalg.vector_norm(flat[i : i + SQ_NORM_BLOCK], dtype=torch.float64)) ** 2
            for i in range(0, flat.numel(), SQ_NORM_BLOCK)
        ]
    # einsum widens to float64 in small buffered pieces: no model-sized temporary (fresh memory costs page
    # faults that, on a VM, take longer than the arithmetic).
    values, out = flat.numpy(), []
    full = values.size // SQ_NORM_BLOCK
    for row in range(0, full, _BLOCKS_PER_CALL):
        rows = values[row * SQ_NORM_BLOCK : min(row + _BLOCKS_PER_CALL, full) * SQ_NORM_BLOCK].reshape(
            -1, SQ_NORM_BLOCK
        )
        out.extend(np.einsum("ij,ij->i", rows, rows, dtype=np.float64).tolist())
    if values.size > full * SQ_NORM_BLOCK:
        tail = values[full * SQ_NORM_BLOCK :]
        out.append(float(np.einsum("i,i->", tail, tail, dtype=np.float64)))
    return out


class SyncMean:
    """xbar_next = mean of the reported coupled averages, plus their spread around it.

    The float64 sum's buffer is kept after ``finish`` and reused by the next round (``reset``), and the mean
    is written into a buffer of ``ReusableBuffers`` that no earlier round's holder uses any more: a fresh
    model-sized allocation every round costs page faults comparable to moving the bytes."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._spare: Tensor | None = None
        self._sq_norms = 0.0
        self._dtype = torch.float32
        self._means = ReusableBuffers()  # each round's mean is written into memory a finished round let go of
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
            self._sum = spare if spare is not None and fits else torch.empty(flat.numel(), dtype=torch.float64)
            self._dtype = mu.dtype
            _elementwise(np.copyto, self._sum, flat, lambda: self._sum.copy_(flat))  # type: ignore[union-attr]
        else:
            total = self._sum
            _elementwise(lambda out, x: np.add(out, x, out=out), total, flat, lambda: total.add_(flat))
        self._sq_norms += squared_norm(flat) if sq_norm is None else sq_norm
        self.count += 1

    def finish(self) -> tuple[Tensor, float]:
        """The mean (in the reports' dtype) and the consensus distance: the RMS distance of the coupled
        averages to their mean, sqrt(mean ||mu_a||^2 - ||mean||^2). Consumes the sum (``reset`` reuses its
        buffer)."""
        if self._sum is None or self.count == 0:
            raise ValueError("no coupled averages were reported for this round")
        total, count = self._sum, self.count
        mean = self._means.take(total.numel(), self._dtype)
        if self._dtype == torch.bfloat16:
            torch.div(total, count, out=mean)
            total_sq = squared_norm(total)
        else:  # one pass: each block of the sum is divided into the narrower mean and squared while in cache
            t, m, total_sq = total.numpy(), mean.numpy(), 0.0
            for i in range(0, t.size, SQ_NORM_BLOCK):
                block = t[i : i + SQ_NORM_BLOCK]
                np.divide(block, count, out=m[i : i + SQ_NORM_BLOCK], casting="same_kind")
                total_sq += float(np.dot(block, block))  # float64 BLAS: a fifth of einsum's time
        spread = self._sq_norms / count - total_sq / count**2
        self._spare, self._sum = total, None
        return mean, max(spread, 0.0) ** 0.5


def _elementwise(
    numpy_op: Callable[[np.ndarray, np.ndarray], object], out: Tensor, x: Tensor, torch_op: Callable[[], object]
) -> None:
    """``numpy_op(out, x)`` on the tensors' memory when numpy has their dtypes (one loop in the calling thread:
    torch would wake its thread team for every call, which stalls on a loaded machine), else ``torch_op``."""
    if torch.bfloat16 in (out.dtype, x.dtype) or out.device.type != "cpu" or x.device.type != "cpu":
        torch_op()
    else:
        numpy_op(out.numpy(), x.numpy())


def easgd_center_step_(center: Tensor, x: Tensor, alpha: float) -> Tensor:
    """Async (EASGD): ``diff = alpha (x - center); center += diff``. Returns the center as it was before, which
    the worker needs to apply the same force to itself (``x -= diff``)."""
    before = center.clone()
    center.lerp_(x.reshape(-1).to(center.dtype), alpha)
    return before
