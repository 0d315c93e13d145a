"""The center's passes over a round's reports, one loop each, compiled by numba and run without the GIL
(numpy where numba is missing):

- ``count_nonfinite``: the finite check, on the values' bits (an exponent of all ones is NaN or Inf);
- ``copy`` / ``add`` / ``add_pair``: the float64 running sum, each also returning the squared norms of
  what it read, which the consensus distance needs, while the values are in registers;
- ``divide``: the mean, sum / count rounded once to the reports' dtype.

Why not numpy: on the 2-vCPU VM the exchange is measured on, numpy's mixed-dtype loops go through its
buffered casting machinery: ``float64 += float32`` takes 2.0 ms per 8 MiB where this loop, squaring as it
adds, takes 0.9, and the divide into float32 1.7 ms against 0.7. The squared norms keep four float64
partial sums, which LLVM keeps in one vector register. The finite check on bits takes 0.11 ms per 8 MiB of
float32, where a float64 squared norm (the check before) took 0.6 and numpy's einsum 2.0; it runs as each
block of an upload arrives, so it is on every exchange's critical path.

Exactness: the sum and the mean are the same bits as numpy's (IEEE adds and divides, element by element).
The norms' partial sums add in another order than numpy's, so the two differ in the last bits; the norms
only feed the consensus distance, a statistic.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

_FLOATS = (np.float32, np.float64)  # what the arithmetic kernels take; anything else goes to numpy
# Bits of an exponent of all ones (NaN or Inf), and the unsigned view that holds them, per float dtype.
_EXPONENT_BITS: dict[np.dtype, tuple[type[np.unsignedinteger[Any]], int]] = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


class _Kernels(NamedTuple):
    count_nonfinite: Any
    accumulate: Any
    add_pair: Any
    divide: Any


def _compile() -> _Kernels | None:
    """The kernels, compiled at their first call per dtype (cached on disk by numba); None without numba."""
    try:
        import numba
    except ImportError as e:  # numba is a dependency; without it numpy does the same work, slower
        log.warning("numba is not importable (%s): the center's sums fall back to numpy, about 3x slower", e)
        return None

    def jit(kernel: Any, cache: bool = True) -> Any:
        """Cached on disk: compiled once per machine (about 0.8 s for all), then loaded (0.3 s)."""
        try:
            return numba.njit(kernel, cache=cache, nogil=True, error_model="numpy", boundscheck=False)
        except RuntimeError:  # numba found no writable place for its cache (read-only install, no home)
            if not cache:
                raise
            return jit(kernel, cache=False)

    @jit
    def count_nonfinite(bits: np.ndarray, exponent: Any) -> int:  # pragma: no cover - compiled
        count = 0
        for i in range(bits.size):
            count += (bits[i] & exponent) == exponent
        return count

    @jit
    def accumulate(total: np.ndarray, values: np.ndarray, add: bool) -> float:  # pragma: no cover - compiled
        a0 = a1 = a2 = a3 = 0.0  # four partial sums: one vector register (LLVM hoists the ``add`` branch)
        whole = values.size // 4 * 4
        for i in range(0, whole, 4):
            v0, v1 = np.float64(values[i]), np.float64(values[i + 1])
            v2, v3 = np.float64(values[i + 2]), np.float64(values[i + 3])
            if add:
                total[i], total[i + 1], total[i + 2], total[i + 3] = (
                    total[i] + v0,
                    total[i + 1] + v1,
                    total[i + 2] + v2,
                    total[i + 3] + v3,
                )
            else:
                total[i], total[i + 1], total[i + 2], total[i + 3] = v0, v1, v2, v3
            a0 += v0 * v0
            a1 += v1 * v1
            a2 += v2 * v2
            a3 += v3 * v3
        for i in range(whole, values.size):
            v = np.float64(values[i])
            total[i] = total[i] + v if add else v
            a0 += v * v
        return (a0 + a1) + (a2 + a3)

    @jit
    def add_pair(total: np.ndarray, first: np.ndarray, values: np.ndarray) -> tuple[float, float]:  # pragma: no cover
        a0 = a1 = b0 = b1 = 0.0
        whole = values.size // 2 * 2
        for i in range(0, whole, 2):
            u0, u1 = np.float64(first[i]), np.float64(first[i + 1])
            v0, v1 = np.float64(values[i]), np.float64(values[i + 1])
            total[i], total[i + 1] = u0 + v0, u1 + v1
            a0 += u0 * u0
            a1 += u1 * u1
            b0 += v0 * v0
            b1 += v1 * v1
        for i in range(whole, values.size):
            u, v = np.float64(first[i]), np.float64(values[i])
            total[i] = u + v
            a0 += u * u
            b0 += v * v
        return a0 + a1, b0 + b1

    @jit
    def divide(total: np.ndarray, count: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
        for i in range(total.size):
            out[i] = total[i] / count

    return _Kernels(count_nonfinite, accumulate, add_pair, divide)


_kernels: list[_Kernels | None] = []  # [] until the first call: importing numba takes a while
_kernels_lock = threading.Lock()


def _kernel(*arrays: np.ndarray, dtypes: tuple[type[np.floating[Any]], ...] = _FLOATS) -> _Kernels | None:
    if any(a.dtype not in dtypes or a.ndim != 1 for a in arrays):
        return None
    with _kernels_lock:
        if not _kernels:
            _kernels.append(_compile())
        return _kernels[0]


def _squares(values: np.ndarray) -> float:
    # einsum widens in small buffered pieces: no float64 temporary of the array's size
    return float(np.einsum("i,i->", values, values, dtype=np.float64))


def count_nonfinite(values: np.ndarray) -> int:
    """How many values of a 1-D float16/32/64 array are NaN or Inf."""
    unsigned, exponent = _EXPONENT_BITS[values.dtype]
    kernels = _kernel(values, dtypes=(np.float16, *_FLOATS))
    if kernels is not None:
        return int(kernels.count_nonfinite(values.view(unsigned), unsigned(exponent)))
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def copy(total: np.ndarray, values: np.ndarray) -> float:
    """``total[:] = values`` (float64 ``total``); returns sum(values ** 2) in float64."""
    kernels = _kernel(total, values)
    if kernels is not None:
        return float(kernels.accumulate(total, values, False))
    np.copyto(total, values)
    return _squares(values)


def add(total: np.ndarray, values: np.ndarray) -> float:
    """``total += values`` (float64 ``total``, ``values`` widened element by element, no temporary); returns
    sum(values ** 2) in float64."""
    kernels = _kernel(total, values)
    if kernels is not None:
        return float(kernels.accumulate(total, values, True))
    np.add(total, values, out=total)
    return _squares(values)


def add_pair(total: np.ndarray, first: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """``total = first + values`` in float64 (a round's first two reports: no pass that only copies); returns
    the squared norms of ``first`` and of ``values``."""
    kernels = _kernel(total, first, values)
    if kernels is not None:
        sq_first, sq_values = kernels.add_pair(total, first, values)
        return float(sq_first), float(sq_values)
    np.add(first, values, out=total, dtype=np.float64)
    return _squares(first), _squares(values)


def divide(total: np.ndarray, count: int, out: np.ndarray) -> None:
    """``out = total / count``, each quotient rounded once to ``out``'s dtype."""
    kernels = _kernel(total, out)
    if kernels is not None:
        kernels.divide(total, float(count), out)
    else:
        np.divide(total, count, out=out, casting="same_kind")
