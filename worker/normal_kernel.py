"""N(0, 1) float32 numbers from a counter-based stream: SplitMix64 bits, Box-Muller with exact float32 steps.

The stream of a 64-bit ``key`` is SplitMix64 seeded with ``key``: its n-th 64-bit output (n = 1, 2, ...) is
``mix(key + n * 0x9E3779B97F4A7C15)`` (Stafford's Mix13 finaliser, as in ``java.util.SplittableRandom``; it
passes BigCrush). Output n makes one pair of normals: its high 24 bits the radius' uniform
``u = (k + 1) / 2^24`` in (0, 1], its low 32 bits' top 24 the angle (24-bit uniforms, like torch's CPU
``randn``). ``fill_normal(out, key, first)`` writes outputs ``first + 1 ...`` as pairs
``out[2j] = r cos(theta), out[2j + 1] = r sin(theta)``, ``r = sqrt(-2 ln u)``. Being counter-based, any
slice of pairs can be computed on its own (threads split a buffer without changing a bit of it), and a
stream's whole state is ``(key, outputs used)``.

Exact to float32 precision: ``ln u`` is cephes' ``logf`` (u = m 2^e, m in [sqrt(1/2), sqrt(2)), a
degree-9 polynomial in m - 1; relative error under 1e-7) and the angle is a quadrant (2 bits, exact
quarter turns) plus phi in (-pi/4, pi/4) (22 bits) through cephes' ``sinf``/``cosf`` polynomials (error
about 1 ulp); the uniforms themselves are exact, so the radius reaches sqrt(2 * 24 ln 2) = 5.77 as
with torch's. Only float32 multiplies, adds and ``sqrt`` (each IEEE-rounded, never fused) and integer
steps: the numba kernel (vectorised by LLVM, under 1 ns per number on a 2-vCPU EPYC) and the numpy
transliteration ``fill_reference`` (used where numba is missing, about 15x slower) give the same bits
on any machine.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, no_type_check

import numpy as np

log = logging.getLogger(__name__)

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio, odd)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_F = np.float32
# cephes logf: ln(1 + x) = x - x^2/2 + x^3 P(x) for x in [sqrt(1/2) - 1, sqrt(2) - 1)
_LOG_P = tuple(
    _F(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = _LOG_P
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)  # ln 2 = HI + LO, HI exact in few bits
_SQRT_HALF = _F(0.707106781186547524)
# cephes sinf/cosf on [-pi/4, pi/4]: sin = x + x^3 S(x^2), cos = 1 - x^2/2 + x^4 C(x^2)
_S0, _S1, _S2 = _F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1)
_C0, _C1, _C2 = _F(2.443315711809948e-5), _F(-1.388731625493765e-3), _F(4.166664568298827e-2)
_HALF, _ONE, _MINUS_TWO = _F(0.5), _F(1.0), _F(-2.0)
_UNIT24 = _F(2.0**-24)
_ANGLE_STEP = _F(math.pi / 2 * 2.0**-22)  # phi = (s + 1/2) * step, s in [-2^21, 2^21)
_BLOCK = 1 << 17  # elements the numpy reference handles at a time (even: blocks start on a pair)


def fill_reference(out: np.ndarray, key: int, first: int) -> None:
    """The specification in numpy (the same float32 operations, in the same order, as the kernel)."""
    n = out.shape[0]
    pairs = (n + 1) // 2
    j = np.arange(pairs, dtype=np.uint64)
    z = np.uint64(key) + (np.uint64(first) + j + np.uint64(1)) * GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    # radius: ln u = e ln 2 + ln(1 + x), u = (1 + x) 2^e
    u = ((z >> np.uint64(40)).astype(np.uint32) + np.uint32(1)).astype(_F) * _UNIT24
    bits = u.view(np.uint32)
    e = (bits >> np.uint32(23)).astype(np.int32) - np.int32(126)
    m = ((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(_F)  # u = m 2^e, m in [1/2, 1)
    small = m < _SQRT_HALF
    e -= small.astype(np.int32)
    x = np.where(small, m + m, m) - _ONE
    xx = x * x
    y = _P0 * x
    for coefficient in _LOG_P[1:]:
        y = (y + coefficient) * x
    y = y * xx
    fe = e.astype(_F)
    y = y + _LN2_LO * fe
    y = y - _HALF * xx
    ln_u = x + y
    ln_u = ln_u + _LN2_HI * fe
    r = np.sqrt(_MINUS_TWO * ln_u)
    # angle: theta = quadrant * pi/2 + phi
    a = (z & np.uint64(0xFFFFFFFF)).astype(np.uint32) >> np.uint32(8)
    q = a >> np.uint32(22)
    phi = (((a & np.uint32(0x3FFFFF)).astype(np.int32) - np.int32(0x200000)).astype(_F) + _HALF) * _ANGLE_STEP
    pp = phi * phi
    s = ((_S0 * pp + _S1) * pp + _S2) * pp * phi + phi
    c = ((_C0 * pp + _C1) * pp + _C2) * pp * pp
    c = c - _HALF * pp
    c = c + _ONE
    swap = (q & np.uint32(1)) != 0  # quarter turns: (c, s) (-s, c) (-c, -s) (s, -c)
    cos_sign = ((q ^ (q >> np.uint32(1))) & np.uint32(1)) << np.uint32(31)
    sin_sign = (q >> np.uint32(1)) << np.uint32(31)
    pair = np.empty((pairs, 2), dtype=_F)
    pair[:, 0] = ((r * np.where(swap, s, c)).view(np.uint32) ^ cos_sign).view(_F)
    pair[:, 1] = ((r * np.where(swap, c, s)).view(np.uint32) ^ sin_sign).view(_F)
    out[:] = pair.reshape(-1)[:n]


class _Kernels(NamedTuple):
    fill: Callable[..., None]
    add: Callable[..., None]


def _compile() -> _Kernels | None:
    """The numba kernels, compiled at their first call (about half a second each); None without numba."""
    try:
        import numba
        from llvmlite import ir
        from numba import types
        from numba.extending import intrinsic
    except ImportError as e:  # numba is a dependency; without it the reference gives the same numbers, slower
        log.warning("numba is not importable (%s): Langevin noise falls back to numpy, about 15x slower", e)
        return None

    @intrinsic
    def _bits(typingctx: Any, value: Any) -> Any:  # float32 -> its uint32 bits, no conversion
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def _float(typingctx: Any, value: Any) -> Any:  # uint32 bits -> the float32 they encode
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    # fastmath off: no reassociation, no fused multiply-add, so every step rounds as the reference's does.
    @numba.njit(inline="always", fastmath=False, error_model="numpy", cache=False)
    @no_type_check
    def _pair(key, index):
        """The pair made from the stream's output ``index`` (>= 1)."""
        z = key + index * GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        u = _F(np.uint32(z >> np.uint64(40)) + np.uint32(1)) * _UNIT24
        bits = _bits(u)
        e = np.int32(bits >> np.uint32(23)) - np.int32(126)
        m = _float((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000))
        small = m < _SQRT_HALF
        e = e - np.int32(small)
        x = (m + m if small else m) - _ONE
        xx = x * x
        y = _P0 * x
        y = (y + _P1) * x
        y = (y + _P2) * x
        y = (y + _P3) * x
        y = (y + _P4) * x
        y = (y + _P5) * x
        y = (y + _P6) * x
        y = (y + _P7) * x
        y = (y + _P8) * x
        y = y * xx
        fe = _F(e)
        y = y + _LN2_LO * fe
        y = y - _HALF * xx
        ln_u = x + y
        ln_u = ln_u + _LN2_HI * fe
        r = np.sqrt(_MINUS_TWO * ln_u)
        a = np.uint32(z & np.uint64(0xFFFFFFFF)) >> np.uint32(8)
        q = a >> np.uint32(22)
        phi = (_F(np.int32(a & np.uint32(0x3FFFFF)) - np.int32(0x200000)) + _HALF) * _ANGLE_STEP
        pp = phi * phi
        s = _S0 * pp
        s = (s + _S1) * pp
        s = (s + _S2) * pp
        s = s * phi + phi
        c = _C0 * pp
        c = (c + _C1) * pp
        c = (c + _C2) * pp
        c = c * pp
        c = c - _HALF * pp
        c = c + _ONE
        swap = (q & np.uint32(1)) != 0
        cos_sign = ((q ^ (q >> np.uint32(1))) & np.uint32(1)) << np.uint32(31)
        sin_sign = (q >> np.uint32(1)) << np.uint32(31)
        return _float(_bits(r * (s if swap else c)) ^ cos_sign), _float(_bits(r * (c if swap else s)) ^ sin_sign)

    @numba.njit(nogil=True, fastmath=False, error_model="numpy", boundscheck=False, cache=False)
    @no_type_check
    def fill_pairs(out, key, first, start, stop):
        """Whole pairs j in [start, stop): out[2j], out[2j + 1] from output first + j + 1."""
        for j in range(start, stop):
            cos_part, sin_part = _pair(key, first + np.uint64(j) + np.uint64(1))
            i = np.uint64(2 * j)  # an unsigned index: no negative-index wraparound, so LLVM vectorises
            out[i] = cos_part
            out[i + np.uint64(1)] = sin_part

    @numba.njit(nogil=True, fastmath=False, error_model="numpy", boundscheck=False, cache=False)
    @no_type_check
    def add_pairs(out, key, first, start, stop, alpha):
        """As ``fill_pairs``, adding ``alpha`` times the pair (a multiply, then an add) to ``out``."""
        for j in range(start, stop):
            cos_part, sin_part = _pair(key, first + np.uint64(j) + np.uint64(1))
            i = np.uint64(2 * j)
            out[i] = out[i] + alpha * cos_part
            out[i + np.uint64(1)] = out[i + np.uint64(1)] + alpha * sin_part

    return _Kernels(fill_pairs, add_pairs)


_kernels: list[_Kernels | None] = []  # [] until the first fill: importing numba takes a while
_kernels_lock = threading.Lock()


def _kernel() -> _Kernels | None:
    with _kernels_lock:
        if not _kernels:
            _kernels.append(_compile())
        return _kernels[0]


def fast() -> bool:
    """Whether the compiled kernel is there (else ``fill_normal`` runs the numpy reference)."""
    return _kernel() is not None


def _check(out: np.ndarray, what: str) -> None:
    if out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError(f"{what}: needs a contiguous float32 vector, got {out.dtype} {out.shape}")


def fill_normal(out: np.ndarray, key: int, first: int) -> None:
    """Fill contiguous float32 ``out`` with N(0, 1): pairs from outputs ``first + 1, first + 2, ...`` of
    the SplitMix64 stream ``key`` (ceil(len/2) of them; an odd length drops the last pair's sine).
    Releases the GIL (numba), so threads can fill disjoint slices, each with its own ``first``."""
    _check(out, "fill_normal")
    kernels = _kernel()
    if kernels is None:
        for start in range(0, out.shape[0], _BLOCK):  # blocks bound the reference's temporaries
            fill_reference(out[start : start + _BLOCK], key, first + start // 2)
        return
    n = out.shape[0]
    k, f = np.uint64(key & (2**64 - 1)), np.uint64(first & (2**64 - 1))
    kernels.fill(out, k, f, 0, n // 2)
    if n % 2:
        last = np.empty(2, dtype=np.float32)
        kernels.fill(last, k, f + np.uint64(n // 2), 0, 1)
        out[n - 1] = last[0]


def add_normal(out: np.ndarray, alpha: float, key: int, first: int) -> None:
    """``out += float32(alpha) * z`` (a multiply, then an add, each rounded to float32), ``z`` what
    ``fill_normal(z, key, first)`` would write: the draw and the update in one pass, no buffer."""
    _check(out, "add_normal")
    a = np.float32(alpha)
    kernels = _kernel()
    if kernels is None:
        z = np.empty(min(out.shape[0], _BLOCK), dtype=np.float32)
        for start in range(0, out.shape[0], _BLOCK):
            part = out[start : start + _BLOCK]
            fill_reference(z[: part.shape[0]], key, first + start // 2)
            part += a * z[: part.shape[0]]
        return
    n = out.shape[0]
    k, f = np.uint64(key & (2**64 - 1)), np.uint64(first & (2**64 - 1))
    kernels.add(out, k, f, 0, n // 2, a)
    if n % 2:
        last = np.empty(2, dtype=np.float32)
        kernels.fill(last, k, f + np.uint64(n // 2), 0, 1)
        out[n - 1] = out[n - 1] + a * last[0]
