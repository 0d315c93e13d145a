"""A job's disk writes happen on its own writer thread, off its lock: a checkpoint stuck on a slow disk
never delays a heartbeat, and a reference that cannot be written at the end fails the job, saying which
file and why, without leaving half a file behind (a real tmpfs, filled)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_faults import fill, tmpfs
from test_round_state import SPEC, run_round, started
from transport_suite import small_spec

from coordinator.disk_writer import DiskWriter
from coordinator.job_records import JobState


@pytest.mark.timeout(60)
def test_a_checkpoint_stuck_on_the_disk_never_delays_a_heartbeat(tmp_path: Path) -> None:
    job, a, b = started(small_spec(**SPEC), tmp_path / "job")
    entered, release = threading.Event(), threading.Event()
    save = job.store.save

    def slow_save(*args: Any, **kwargs: Any) -> Path:  # a disk that takes its time (an NFS mount, a dying SSD)
        entered.set()
        release.wait(30)
        return save(*args, **kwargs)

    job.store.save = slow_save  # type: ignore[method-assign]
    for k in range(3):
        run_round(job, a, b, k)
    closing = threading.Thread(target=run_round, args=(job, a, b, 3), daemon=True)
    closing.start()  # round 3 gathers the model and checkpoints it
    try:
        assert entered.wait(30), "the checkpoint of round 3 was never written"
        answers: list[bool] = []
        heartbeat = threading.Thread(target=lambda: answers.append(a.heartbeat() and b.heartbeat()), daemon=True)
        heartbeat.start()
        heartbeat.join(10)
        assert answers == [True], "heartbeats waited for the disk"
        assert job.state is JobState.RUNNING and job.round == 4
    finally:
        release.set()
    closing.join(30)
    job.flush()
    latest = job.store.latest()
    assert latest is not None and latest.round == 4
    job.close()


@pytest.mark.timeout(120)
def test_a_reference_the_full_disk_refuses_fails_the_job_naming_the_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        job, a, b = started(small_spec(**SPEC), fs / "job")
        for k in range(7):
            run_round(job, a, b, k)
        job.flush()
        fill(fs)
        run_round(job, a, b, 7)  # the last round: its checkpoint and the reference meet a full disk
        job.flush()
        assert job.state is JobState.FAILED
        assert "reference.safetensors" in job.message and "No space left on device" in job.message, job.message
        assert not [p.name for p in (fs / "job").iterdir() if p.name.endswith(".tmp")]
        job.close()


def test_the_disk_writer_keeps_order_and_outlives_a_failed_write() -> None:
    writer = DiskWriter("test-writer")
    done: list[int] = []

    def failing() -> None:
        raise OSError("disk gone")

    first = writer.submit(lambda: done.append(1))
    broken = writer.submit(failing)
    last = writer.submit(lambda: done.append(2) or 7)
    assert last.result(10) == 7 and first.done()
    with pytest.raises(OSError, match="disk gone"):
        broken.result(0)
    assert done == [1, 2]
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None).result(0)
    writer.flush(1)  # closed: returns at once
