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
