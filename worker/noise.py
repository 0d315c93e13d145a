"""Langevin noise for the worker's chain: N(0, I) for a flat parameter buffer, cheap on CPU.

torch's CPU normal generator (mt19937, one element at a time, then Box-Muller) is single-threaded and costs
about 3.5 ns of CPU per element on a 2-core EPYC: 6.5 ms per inner step for mnistfc's 1.9M parameters, a
third of the step. On CPU, for float32 buffers of more than ``CHUNK`` elements, ``NoiseStream`` instead
draws from a counter-based stream (``worker.normal_kernel``: SplitMix64 bits and a Box-Muller made of
exact float32 steps, one vectorised pass compiled by numba): about 0.9 ns of CPU per element.

- Each pair of numbers is a function of the stream's 64-bit key and its position, so a draw is split into
  slices filled by a small thread pool (the kernel releases the GIL) without changing a bit: the numbers
  do not depend on how many threads there are, nor on whether numba is there (its numpy transliteration
  gives the same bits, slower).
- The next step's noise is drawn ahead, into the other of two buffers, while the caller uses this one.

Reproducible: the key comes from this generator (``manual_seed``), and the k-th draw is the stream's
outputs after the first k. Checkpointable: ``stream_state`` is ``[[key, outputs used]]`` after the last
draw handed out (not the one drawn ahead); ``load_stream_state`` restores it and throws away what was
drawn ahead, so a resumed run draws exactly what the uninterrupted one drew. On CUDA (Philox: one cheap
kernel), for other dtypes and for buffers of at most ``CHUNK`` elements the generator itself draws, as
``torch.randn(..., generator=g)`` does. Figures: bench/README.md, "Inner step with Langevin noise".
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.normal_kernel import fill_normal

CHUNK = 1 << 18  # buffers of more elements take the counter-based path; also the smallest slice a thread fills
_STATE_WORDS = 2  # key, outputs used (one row)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool_threads() -> int:
    """Threads that fill noise slices (one process-wide pool, shared by its replicas)."""
    return max(2, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(pool_threads(), thread_name_prefix="langevin-noise")
        return _pool


def outputs_used(numel: int) -> int:
    """Stream outputs one draw of ``numel`` numbers takes (one per pair)."""
    return (numel + 1) // 2


@dataclass
class _Draw:
    """One draw in flight: ``buffer`` is complete once every future has finished; it used the stream's
    outputs after the first ``first``."""

    buffer: Tensor
    futures: list[Future[None]]
    first: int

    def wait(self) -> Tensor:
        for future in self.futures:
            future.result()  # re-raises a failed fill
        return self.buffer


class NoiseStream(torch.Generator):
    """The replica's noise generator (a ``torch.Generator``, seeded and saved like one) that also draws
    Langevin noise for large float32 CPU buffers from a counter-based stream, in parallel slices, one
    step ahead (see the module docstring); the stream's position comes and goes with
    ``stream_state``/``load_stream_state``.

    ``normal(like)`` returns a buffer that stays valid until the next call: the caller reads it before
    asking for the next draw. Use from one thread at a time (a replica's)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:  # torch.Generator.__new__ takes the device
        self._key: int | None = None
        self._used = 0  # outputs used by draws started (the one drawn ahead included)
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._ahead: _Draw | None = None

    def normal(self, like: Tensor) -> Tensor:
        """N(0, I) with ``like``'s shape, dtype and device."""
        numel = like.numel()
        if like.device.type != "cpu" or like.dtype != torch.float32 or numel <= CHUNK:
            return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=self)
        if self._buffers is None or self._buffers[0].numel() != numel:
            self._cancel()
            self._buffers = (torch.empty(numel), torch.empty(numel))
        if self._key is None:  # seeded from this generator, so manual_seed decides the stream
            hi, lo = (int(v) for v in torch.randint(0, 2**32, (2,), generator=self, dtype=torch.int64))
            self._key = (hi << 32) | lo
        draw, self._ahead = self._ahead, None
        if draw is None:
            draw = self._start(self._buffers[0])
        buffer = draw.wait()
        # Draw the next step's noise into the other buffer while the caller uses this one.
        self._ahead = self._start(self._buffers[1] if buffer is self._buffers[0] else self._buffers[0])
        return buffer.view(like.shape)

    def stream_state(self) -> Tensor | None:
        """``[[key, outputs used]]`` (int64; the key's 64 bits as a signed number) after the last draw
        handed out, that is before the one drawn ahead; None before the first counter-based draw."""
        if self._key is None:
            return None
        used = self._used if self._ahead is None else self._ahead.first
        return torch.tensor([[_signed(self._key), used]], dtype=torch.int64)

    def load_stream_state(self, state: Tensor | None) -> None:
        """Continue from a ``stream_state()`` (None: the stream is keyed afresh from this generator at the
        next counter-based draw). Anything drawn ahead is thrown away."""
        if state is not None and (state.dtype != torch.int64 or tuple(state.shape) != (1, _STATE_WORDS)):
            raise ValueError(
                f"noise stream state: expected int64 of shape (1, {_STATE_WORDS}) [key, outputs used], got "
                f"{state.dtype} {tuple(state.shape)} (rows of 6 are the former per-chunk SFC64 format)"
            )
        if state is not None and int(state[0, 1]) < 0:
            raise ValueError(f"noise stream state: outputs used must be >= 0, got {int(state[0, 1])}")
        self._cancel()
        self._buffers = None
        if state is None:
            self._key, self._used = None, 0
        else:
            self._key, self._used = int(state[0, 0]) & (2**64 - 1), int(state[0, 1])

    def _start(self, buffer: Tensor) -> _Draw:
        """Fill ``buffer`` from the stream's next outputs: up to ``pool_threads()`` slices of whole pairs, each
        of at least ``CHUNK`` elements, filled in the pool."""
        assert self._key is not None
        numel, first = buffer.numel(), self._used
        self._used += outputs_used(numel)
        slices = max(1, min(pool_threads(), numel // CHUNK))
        bounds = [2 * (outputs_used(numel) * i // slices) for i in range(slices + 1)]
        bounds[-1] = numel
        array, pool, key = buffer.numpy(), _executor(), self._key
        futures = [
            pool.submit(fill_normal, array[lo:hi], key, first + lo // 2) for lo, hi in itertools.pairwise(bounds)
        ]
        return _Draw(buffer, futures, first)

    def _cancel(self) -> None:
        """Wait for a draw made ahead and give its outputs back to the stream."""
        draw, self._ahead = self._ahead, None
        if draw is None:
            return
        for future in draw.futures:
            future.exception()  # waits; a failed fill goes with the draw
        self._used = draw.first


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def normal_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) shaped like ``like``: from a ``NoiseStream`` (counter-based, parallel, drawn ahead on CPU),
    else from ``generator`` (None: torch's global RNG) as ``torch.randn`` draws it."""
    if isinstance(generator, NoiseStream):
        return generator.normal(like)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
