"""Model-sized buffers that are reused once nothing refers to their memory any more: the coordinator's
round means (coordinator/reference.py) and the worker's received references (worker/transports/datachannel.py).

Why: writing a model into freshly allocated memory costs a page fault per 4 KiB page (about 6 us on a VM;
``parle coordinator``'s allocator settings map every large block afresh, and glibc does so for any block
of 32 MiB and up): at 32 MiB that was about half of ``Job.report``'s time, more than the arithmetic, and
as much again in the worker that receives the reference.

Lifetime, for the coordinator's mean (the hardest case): it becomes the center, the closed round's
reference (which replies are still being sent from, over gRPC or the data channel, after the job's lock
is released), the round state handed to the writer thread, a pending model, a checkpoint's tensor, and in
async mode the live center that moves on with every exchange. Rather than have each of those hand the
memory back (and get one of them wrong), ``take`` hands out a *view* of a buffer the ring keeps, and a
buffer is taken again only when its storage has no user besides the ring's own tensor: every holder above
keeps a tensor (or a numpy array or memoryview made from one, which keeps that tensor alive), and each of
those counts as a user of the storage. So memory is reused only when it is provably unreferenced, whoever
held it. The worker's loop likewise keeps the previous round's reply until the next one arrives: its
buffer is simply not reused then (a ring of two alternates), and a caller that keeps a reference for
longer gets fresh memory, not a tensor that changes under it. (Holding only the storage object,
``t.untyped_storage()``, is not seen: nothing here does.)
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from protos import parle_pb2 as pb
from protos.codec import to_proto_dtype, wire_view

_NARROWED = {pb.COMPRESSION_FP16: torch.float16, pb.COMPRESSION_BF16: torch.bfloat16}


# A private torch function (present in the pinned torch). A torch without it gets fresh memory every time:
# slower, never wrong.
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(t: Tensor) -> int:
    assert _USE_COUNT is not None
    return int(_USE_COUNT(t.untyped_storage()._cdata))


class ReusableBuffers:
    """At most ``keep`` buffers; ``take`` returns an unreferenced one of the right size and dtype, else a
    new one (which replaces the oldest buffer when the ring is full: that one lives on, and is freed, with
    its holders). Free buffers that ``take`` does not hand out are let go: in a steady state of rounds the
    ring holds the buffers still in use and the one being handed out, nothing idle.

    ``keep_idle``: free buffers stay in the ring instead, and the smallest free buffer at least as large
    serves a take (as a view of its start): for buffers that jobs of different sizes share, like the data
    channel's receive buffers, which would otherwise be let go and faulted in again at every switch."""

    def __init__(self, keep: int = 4, *, keep_idle: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self.keep_idle = keep_idle
        self._ring: list[tuple[Tensor, int]] = []  # (buffer, its storage's users when nobody else holds it)
        self._lock = threading.Lock()  # threads that take at once never get the same buffer

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat tensor of ``numel`` elements whose memory nobody else uses; its content is undefined."""
        if _USE_COUNT is None:
            return torch.empty(numel, dtype=dtype)
        with self._lock:
            free = [base for base, alone in self._ring if _storage_users(base) == alone]
            idle = {id(base) for base in free}
            fits = [
                base
                for base in free
                if base.dtype == dtype and (base.numel() == numel or (self.keep_idle and base.numel() > numel))
            ]
            chosen = min(fits, key=lambda base: base.numel()) if fits else None
            if not self.keep_idle:  # let go of free buffers not needed now: idle memory is the one handed out
                self._ring = [(base, alone) for base, alone in self._ring if base is chosen or id(base) not in idle]
            if chosen is None:
                chosen = torch.empty(numel, dtype=dtype)
                if len(self._ring) >= self.keep:
                    self._ring.pop(0)
                self._ring.append((chosen, _storage_users(chosen)))
            return chosen[:numel]  # a new view: while it (or anything made from it) lives, it is busy

    def converted(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x.to(dtype)`` (a CPU tensor, e.g. fp16 off the wire widened to float32) in a taken buffer. torch
        converts, not numpy: its half-precision casts are vectorised (100 MiB of float32 to fp16: 7-9 ms
        even on one thread, numpy 68 ms)."""
        out = self.take(x.numel(), dtype)
        out.copy_(x.detach().reshape(-1))
        return out.view(x.shape)

    def clear(self) -> None:
        """Forget every buffer (those still held are freed with their holders)."""
        with self._lock:
            self._ring.clear()

    def __len__(self) -> int:
        return len(self._ring)


def narrowed_wire_view(
    name: str, tensor: Tensor, compression: pb.Compression, buffers: ReusableBuffers
) -> tuple[pb.TensorHeader, np.ndarray]:
    """``codec.wire_view``, but a CPU tensor narrowed for the wire (fp16/bf16) is narrowed into memory of
    ``buffers``, held by the returned array until it is dropped (``wire_view`` narrows into fresh memory)."""
    narrow = _NARROWED.get(compression)
    if narrow is None or tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return wire_view(name, tensor, compression)
    header, view = wire_view(name, buffers.converted(tensor, narrow))  # its own bytes, as they are
    header.dtype = to_proto_dtype(tensor.dtype)  # what the receiver widens them back to
    header.compression = compression
    return header, view
