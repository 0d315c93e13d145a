"""Langevin noise for the worker's chain: N(0, I) for a flat parameter buffer, cheap on CPU.

torch's CPU normal generator (mt19937, one element at a time, then Box-Muller) is single-threaded and costs
about 3.5 ns of CPU per element on a 2-core EPYC: 6.5 ms per inner step for mnistfc's 1.9M parameters, a
third of the step. On CPU, for float32 buffers of more than ``SMALL`` elements, ``NoiseStream`` instead
draws from a counter-based stream (``worker.normal_kernel``: SplitMix64 bits and a Box-Muller made of
exact float32 steps, one vectorised pass compiled by numba): about 0.95 ns of CPU per element.

The draw runs on the caller's thread, between the gradient and the update, and ``add_normal_`` fuses it
with the update (``y += alpha * z`` in the same pass, no buffer). Drawing in pool threads while the
gradient is computed measured slower on a 2-vCPU machine (1.21x SGD's step vs 1.12x, mnistfc): with both
cores in the gradient's OpenMP region, a thread beside it delays the whole region by more than the CPU
time it takes. With noise, mnistfc's inner step measured 1.07-1.16x SGD's (target 1.15x; 1.26-1.43x with
the previous numpy SFC64 chunks): the step pays the draw's ~1.8 ms of CPU in full (bench/README.md,
"Inner step with Langevin noise").

Reproducible: the stream's key comes from this generator (``manual_seed``), and a draw of n numbers takes
the stream's next ceil(n/2) outputs, so the k-th draw depends only on the seed and the sizes drawn before;
the numbers do not depend on the machine nor on whether numba is there (its numpy transliteration gives
the same bits, slower). Checkpointable: ``stream_state`` is ``[[key, outputs used]]``;
``load_stream_state`` restores it, so a resumed run draws exactly what the uninterrupted one drew. On
CUDA (Philox: one cheap kernel), for other dtypes and for buffers of at most ``SMALL`` elements the
generator itself draws, as ``torch.randn(..., generator=g)`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.normal_kernel import add_normal, fill_normal

SMALL = 1 << 18  # buffers of more elements take the counter-based path (below, torch.randn costs little)
_STATE_WORDS = 2  # key, outputs used (one row)


def outputs_used(numel: int) -> int:
    """Stream outputs one draw of ``numel`` numbers takes (one per pair)."""
    return (numel + 1) // 2


class NoiseStream(torch.Generator):
    """The replica's noise generator (a ``torch.Generator``, seeded and saved like one) that also draws
    Langevin noise for large float32 CPU buffers from a counter-based stream (see the module docstring);
    the stream's position comes and goes with ``stream_state``/``load_stream_state``.

    ``normal(like)`` returns a buffer that stays valid until the next call: the caller reads it before
    asking for the next draw. Use from one thread at a time (a replica's)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:  # torch.Generator.__new__ takes the device
        self._key: int | None = None
        self._used = 0
        self._buffer: Tensor | None = None

    def normal(self, like: Tensor) -> Tensor:
        """N(0, I) with ``like``'s shape, dtype and device."""
        numel = like.numel()
        if not _counter_path(like):
            return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=self)
        if self._buffer is None or self._buffer.numel() != numel:
            self._buffer = torch.empty(numel)
        fill_normal(self._buffer.numpy(), self._next_key(), self._used)
        self._used += outputs_used(numel)
        return self._buffer.view(like.shape)

    def add_normal_(self, y: Tensor, alpha: float) -> None:
        """``y += alpha * N(0, I)``, the noise being what ``normal(y)`` would return. On the counter-based
        path, one pass over ``y`` (draw and update fused, no buffer); ``alpha`` is rounded to float32 as
        ``Tensor.add_`` rounds it."""
        if not (_counter_path(y) and y.is_contiguous()):
            y.add_(self.normal(y), alpha=alpha)
            return
        add_normal(y.detach().view(-1).numpy(), alpha, self._next_key(), self._used)
        self._used += outputs_used(y.numel())

    def _next_key(self) -> int:
        if self._key is None:  # keyed from this generator, so manual_seed decides the stream
            hi, lo = (int(v) for v in torch.randint(0, 2**32, (2,), generator=self, dtype=torch.int64))
            self._key = (hi << 32) | lo
        return self._key

    def stream_state(self) -> Tensor | None:
        """``[[key, outputs used]]`` (int64; the key's 64 bits as a signed number); None before the first
        counter-based draw."""
        if self._key is None:
            return None
        return torch.tensor([[_signed(self._key), self._used]], dtype=torch.int64)

    def load_stream_state(self, state: Tensor | None) -> None:
        """Continue from a ``stream_state()`` (None: the stream is keyed afresh from this generator at the
        next counter-based draw)."""
        if state is not None and (state.dtype != torch.int64 or tuple(state.shape) != (1, _STATE_WORDS)):
            raise ValueError(
                f"noise stream state: expected int64 of shape (1, {_STATE_WORDS}) [key, outputs used], got "
                f"{state.dtype} {tuple(state.shape)} (rows of 6 are the former per-chunk SFC64 format)"
            )
        if state is not None and int(state[0, 1]) < 0:
            raise ValueError(f"noise stream state: outputs used must be >= 0, got {int(state[0, 1])}")
        if state is None:
            self._key, self._used = None, 0
        else:
            self._key, self._used = int(state[0, 0]) & (2**64 - 1), int(state[0, 1])


def _counter_path(like: Tensor) -> bool:
    return like.device.type == "cpu" and like.dtype == torch.float32 and like.numel() > SMALL


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def normal_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) shaped like ``like``: from a ``NoiseStream`` (counter-based on CPU), else from ``generator``
    (None: torch's global RNG) as ``torch.randn`` draws it."""
    if isinstance(generator, NoiseStream):
        return generator.normal(like)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def add_normal_(y: Tensor, alpha: float, generator: torch.Generator | None) -> None:
    """``y += alpha * normal_like(y, generator)``; a ``NoiseStream`` on CPU does it in one fused pass."""
    if isinstance(generator, NoiseStream):
        generator.add_normal_(y, alpha)
    else:
        y.add_(normal_like(y, generator), alpha=alpha)
