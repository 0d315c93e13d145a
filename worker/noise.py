"""Langevin noise for the worker's chain: N(0, I) for a flat parameter buffer, cheap on CPU.

torch's CPU normal generator (mt19937, one element at a time, then Box-Muller) is single-threaded and costs
about 3.4 ns of CPU per element on a 2-core EPYC: 6.3 ms per inner step for mnistfc's 1.9M parameters, a
third of the step. On CPU, for float32 buffers of more than one chunk, ``NoiseStream`` instead

- splits the buffer into fixed chunks of ``CHUNK`` elements, each with its own SFC64 bit generator (numpy;
  the chunks' streams are spawned from one ``SeedSequence`` seeded by the replica's noise generator), and
  turns the raw bits into normals with a vectorised Box-Muller (24-bit uniforms, like torch's): about
  2.1 ns per element;
- fills the chunks in a small thread pool (numpy releases the GIL), so the numbers do not depend on how
  many threads there are;
- draws the next step's noise ahead of time, while the gradient is computed (two buffers: the one the
  step reads, the one being filled).

On a 2-vCPU machine the win is the cheaper generator alone (the step pays the draw's CPU time whichever
thread draws it, both cores being busy in the gradient's OpenMP region); the pool and the draw ahead are
for machines with cores to spare. Figures: bench/README.md, "Inner step with Langevin noise".

Reproducible: the k-th draw depends only on the seeds and k. Checkpointable: ``stream_state`` is the chunk
generators' states after the last draw handed out (not the one drawn ahead); ``load_stream_state``
restores them and throws away whatever was drawn ahead, so a resumed run draws exactly what the
uninterrupted one drew. On CUDA (Philox: one cheap kernel), for other dtypes and for buffers of at most
one chunk the generator itself draws, as ``torch.randn(..., generator=g)`` does.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CHUNK = 1 << 18  # elements per chunk generator: 1 MiB of float32
_STATE_WORDS = 6  # SFC64: 4 state words, has_uint32, uinteger
_ANGLE = np.float32(2.0 * math.pi / 2.0**32)  # int32 bits -> [-pi, pi)
_UNIT24 = np.float32(2.0**-24)
_MINUS_TWO = np.float32(-2.0)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool_threads() -> int:
    """Threads that draw noise chunks (one process-wide pool, shared by its replicas)."""
    return max(2, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(pool_threads(), thread_name_prefix="langevin-noise")
        return _pool


def chunk_count(numel: int) -> int:
    return -(-numel // CHUNK)


def box_muller_(out: np.ndarray, bits: np.random.SFC64) -> None:
    """Fill float32 ``out`` with N(0, 1) from ``bits``: ceil(n/2) raw 64-bit draws, each one pair: the high
    24 bits of its first half give the radius sqrt(-2 ln u), u in (0, 1], its second half the angle."""
    n = out.shape[0]
    p, q = (n + 1) // 2, n // 2
    raw = bits.random_raw(p)
    words, signed, scratch = raw.view(np.uint32), raw.view(np.int32), raw.view(np.float32)
    radius, angle = scratch[:p], scratch[p:]
    np.right_shift(words[:p], 8, out=words[:p])
    np.add(signed[:p], 1, out=signed[:p])  # 1 .. 2^24
    np.copyto(radius, signed[:p], casting="unsafe")  # exact: the values fit float32's mantissa
    np.multiply(radius, _UNIT24, out=radius)
    np.log(radius, out=radius)
    np.multiply(radius, _MINUS_TWO, out=radius)
    np.sqrt(radius, out=radius)
    np.copyto(angle, signed[p:], casting="unsafe")
    np.multiply(angle, _ANGLE, out=angle)
    np.cos(angle, out=out[:p])
    np.multiply(out[:p], radius, out=out[:p])
    np.sin(angle[:q], out=out[p:])
    np.multiply(out[p:], radius[:q], out=out[p:])


@dataclass
class _Draw:
    """One draw in flight: ``buffer`` is complete once every future has finished. ``before``: each chunk
    generator's state before this draw (the filling task records it first, off the caller's thread)."""

    buffer: Tensor
    futures: list[Future[None]]
    before: list[list[int] | None]

    def wait(self) -> Tensor:
        for future in self.futures:
            future.result()  # re-raises a failed fill
        return self.buffer


def _fill(buffer: np.ndarray, generators: list[np.random.SFC64], chunks: range, before: list[list[int] | None]) -> None:
    for c in chunks:
        before[c] = _get_state(generators[c])
        box_muller_(buffer[c * CHUNK : (c + 1) * CHUNK], generators[c])


def _get_state(bits: np.random.SFC64) -> list[int]:
    state = bits.state
    words = np.asarray(state["state"]["state"], dtype=np.uint64).view(np.int64)
    return [int(w) for w in words] + [int(state["has_uint32"]), int(state["uinteger"])]


def _set_state(bits: np.random.SFC64, row: Tensor) -> None:
    values = [int(v) for v in row]
    words = np.array(values[:4], dtype=np.int64).view(np.uint64)
    bits.state = {
        "bit_generator": "SFC64",
        "state": {"state": words},
        "has_uint32": values[4],
        "uinteger": values[5] & 0xFFFFFFFF,
    }


class NoiseStream(torch.Generator):
    """The replica's noise generator (a ``torch.Generator``, seeded and saved like one) that also draws
    Langevin noise for large float32 CPU buffers in parallel chunks, one step ahead (see the module
    docstring); its chunk generators' states come and go with ``stream_state``/``load_stream_state``.

    ``normal(like)`` returns a buffer that stays valid until the next call: the caller reads it before
    asking for the next draw. Use from one thread at a time (a replica's)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:  # torch.Generator.__new__ takes the device
        self._chunks: list[np.random.SFC64] = []
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._ahead: _Draw | None = None

    def normal(self, like: Tensor) -> Tensor:
        """N(0, I) with ``like``'s shape, dtype and device."""
        numel = like.numel()
        if like.device.type != "cpu" or like.dtype != torch.float32 or numel <= CHUNK:
            return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=self)
        if self._buffers is None or self._buffers[0].numel() != numel:
            self._prepare(numel)
        assert self._buffers is not None
        draw, self._ahead = self._ahead, None
        if draw is None:
            draw = self._start(self._buffers[0])
        buffer = draw.wait()
        # Draw the next step's noise into the other buffer while the caller uses this one.
        self._ahead = self._start(self._buffers[1] if buffer is self._buffers[0] else self._buffers[0])
        return buffer.view(like.shape)

    def stream_state(self) -> Tensor | None:
        """The chunk generators' states (int64, one row each) after the last draw handed out, that is
        before the one drawn ahead; None before the first chunked draw."""
        if not self._chunks:
            return None
        if self._ahead is None:
            return self._chunk_states()
        self._ahead.wait()
        return torch.tensor(self._ahead.before, dtype=torch.int64)

    def load_stream_state(self, state: Tensor | None) -> None:
        """Continue from a ``stream_state()`` (None: the chunk generators are seeded afresh from this
        generator at the next chunked draw). Anything drawn ahead is thrown away."""
        self._cancel()
        self._buffers = None
        if state is None:
            self._chunks = []
            return
        if state.dim() != 2 or state.shape[1] != _STATE_WORDS:
            raise ValueError(f"noise stream state: expected shape (chunks, {_STATE_WORDS}), got {tuple(state.shape)}")
        self._chunks = [np.random.SFC64(0) for _ in range(state.shape[0])]
        self._set_chunk_states(state)

    def _prepare(self, numel: int) -> None:
        self._cancel()
        count = chunk_count(numel)
        if len(self._chunks) != count:
            if self._chunks:
                raise ValueError(f"noise stream: {len(self._chunks)} chunk generators, a buffer of {count} chunks")
            entropy = [int(v) for v in torch.randint(0, 2**32, (4,), generator=self, dtype=torch.int64)]
            self._chunks = [np.random.SFC64(seq) for seq in np.random.SeedSequence(entropy).spawn(count)]
        self._buffers = (torch.empty(numel), torch.empty(numel))

    def _start(self, buffer: Tensor) -> _Draw:
        pool, threads, count = _executor(), pool_threads(), len(self._chunks)
        ranges = [range(count * i // threads, count * (i + 1) // threads) for i in range(threads)]
        array, before = buffer.numpy(), list[list[int] | None]([None] * count)
        futures = [pool.submit(_fill, array, self._chunks, r, before) for r in ranges if len(r) > 0]
        return _Draw(buffer, futures, before)

    def _cancel(self) -> None:
        """Wait for a draw made ahead and roll the chunk generators back to before it."""
        draw, self._ahead = self._ahead, None
        if draw is None:
            return
        for future in draw.futures:
            future.exception()  # waits; a failed fill goes with the draw
        for bits, state in zip(self._chunks, draw.before, strict=True):
            if state is not None:
                _set_state(bits, torch.tensor(state))

    def _chunk_states(self) -> Tensor:
        return torch.tensor([_get_state(g) for g in self._chunks], dtype=torch.int64)

    def _set_chunk_states(self, states: Tensor) -> None:
        for g, row in zip(self._chunks, states, strict=True):
            _set_state(g, row)


def normal_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) shaped like ``like``: from a ``NoiseStream`` (parallel, drawn ahead on CPU), else from
    ``generator`` (None: torch's global RNG) as ``torch.randn`` draws it."""
    if isinstance(generator, NoiseStream):
        return generator.normal(like)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
