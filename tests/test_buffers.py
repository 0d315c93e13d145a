"""ReusableBuffers: memory is handed out again only once nothing refers to it."""

from __future__ import annotations

import pytest
import torch

from coordinator.reference import SyncMean
from protos.buffers import ReusableBuffers


def test_a_buffer_is_reused_only_when_no_tensor_array_or_memoryview_made_from_it_is_alive() -> None:
    ring = ReusableBuffers(keep=8)
    first = ring.take(1000, torch.float32)
    ptr = first.data_ptr()
    view, array = first.view(10, 100)[3], first.numpy()
    memory = memoryview(first.numpy())
    del first
    busy = []  # what take() hands out meanwhile is kept, so that it cannot be the one reused either
    for holder in ("view", "array", "memory"):
        busy.append(ring.take(1000, torch.float32))
        assert busy[-1].data_ptr() != ptr, f"reused while a {holder} of it was alive"
        if holder == "view":
            del view
        elif holder == "array":
            del array
        else:
            del memory
    assert ring.take(1000, torch.float32).data_ptr() == ptr  # nothing refers to it now


def test_the_ring_is_bounded_and_sizes_and_dtypes_do_not_mix() -> None:
    ring = ReusableBuffers(keep=3)
    held = [ring.take(10, torch.float32) for _ in range(5)]
    assert len(ring) == 3 and len({t.data_ptr() for t in held}) == 5  # all busy: fresh ones, oldest evicted
    del held
    ring.take(10, torch.float32)  # one of the freed buffers; the other free ones are let go
    assert len(ring) == 1
    a = ring.take(10, torch.float64)
    assert a.dtype == torch.float64 and a.numel() == 10
    b = ring.take(20, torch.float32)
    assert b.numel() == 20
    with pytest.raises(ValueError, match="keep"):
        ReusableBuffers(keep=0)


def test_a_mean_that_is_still_held_is_never_overwritten_by_a_later_round() -> None:
    sums, means = SyncMean(), []
    for k in range(6):
        sums.add(torch.full((100,), float(k)))
        mean, _ = sums.finish()
        sums.reset()
        if k % 2 == 0:
            means.append((k, mean))  # a holder: a reply in flight, the round state writer, a checkpoint...
    assert [float(m[0]) for _, m in means] == [0.0, 2.0, 4.0]
    assert all(bool((m == k).all()) for k, m in means)


def test_keep_idle_keeps_free_buffers_and_serves_smaller_takes_from_larger_ones() -> None:
    ring = ReusableBuffers(keep=4, keep_idle=True)
    big, small = ring.take(1000, torch.uint8), ring.take(100, torch.uint8)
    big_ptr, small_ptr = big.data_ptr(), small.data_ptr()
    del big, small
    assert ring.take(100, torch.uint8).data_ptr() == small_ptr  # the smallest that fits
    held = ring.take(50, torch.uint8)  # both free: again the smallest
    assert held.data_ptr() == small_ptr and held.numel() == 50
    other = ring.take(100, torch.uint8)  # the small one is busy: the big one serves, as a view of its start
    assert other.data_ptr() == big_ptr and other.numel() == 100
    assert len(ring) == 2  # nothing let go, nothing new
    del other
    assert ring.take(1000, torch.uint8).data_ptr() == big_ptr
