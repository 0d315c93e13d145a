"""The center's compiled passes (coordinator/sum_kernels.py) against numpy, and the finite check on bits."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import sum_kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_sums_and_means_equal_numpy_bit_for_bit(dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(100_003).astype(dtype) * 1e3 for _ in range(2))  # a length that is not 4k

    def passes() -> tuple[list[np.ndarray], list[float]]:
        total, pair, mean = np.empty(a.size), np.empty(a.size), np.empty(a.size, dtype)
        norms = [sum_kernels.copy(total, a), sum_kernels.add(total, b), *sum_kernels.add_pair(pair, a, b)]
        sum_kernels.divide(total, 3, mean)
        return [total, pair, mean], norms

    assert sum_kernels._kernel(a) is not None, "numba is a dependency: the compiled kernels must load"
    compiled = passes()
    monkeypatch.setattr(sum_kernels, "_kernels", [None])
    plain = passes()
    for x, y in zip(compiled[0], plain[0], strict=True):
        assert np.array_equal(x, y)
    exact = [float(np.sum(a.astype(np.float64) ** 2)), float(np.sum(b.astype(np.float64) ** 2))]
    assert compiled[1] == pytest.approx([exact[0], exact[1], exact[0], exact[1]], rel=1e-12)
    assert plain[1] == pytest.approx(compiled[1], rel=1e-12)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_finite_check_counts_nan_and_inf_and_nothing_else(
    dtype: type, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not compiled:
        monkeypatch.setattr(sum_kernels, "_kernels", [None])
    info = np.finfo(dtype)
    finite = np.array([0.0, -0.0, 1.0, info.max, -info.max, info.tiny, info.smallest_subnormal], dtype=dtype)
    assert sum_kernels.count_nonfinite(finite) == 0
    values = np.zeros(1001, dtype=dtype)
    values[[3, 500, 1000]] = [np.nan, np.inf, -np.inf]
    values[7] = -np.nan
    assert sum_kernels.count_nonfinite(values) == 4
    payload = np.zeros(1, dtype=dtype)
    payload.view(np.uint8)[:] = 0xFF  # every bit set: a NaN with a payload
    assert sum_kernels.count_nonfinite(payload) == 1


def test_the_kernels_compile_where_numba_has_nowhere_to_cache_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only install with no home directory: numba refuses cache=True; the kernels compile uncached."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # no place numba may write its cache
    monkeypatch.setattr(sum_kernels, "_kernels", [])  # compile afresh
    values = np.arange(10, dtype=np.float32)
    assert sum_kernels._kernel(values) is not None
    assert sum_kernels.copy(np.empty(10), values) == float(np.sum(values.astype(np.float64) ** 2))
