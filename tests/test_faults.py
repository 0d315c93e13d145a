"""Faults that are not the caller's: a coordinator bug answers INTERNAL (never INVALID_ARGUMENT), and a
full disk during a checkpoint keeps the previous checkpoint, leaves no temporary files, tells the operator,
and the workers train on without an error. Real gRPC on 127.0.0.1, a real (tmpfs) file system."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

from cluster.client import Endpoint, JobsClient
from coordinator.checkpoint import CheckpointStore
from coordinator.logtext import capped
from coordinator.server import CoordinatorServer
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.spec import resolve
from worker.loop import WorkerLoop
from worker.transports.grpc import GrpcTransport
from worker.workloads.trust import Trust

SPEC: dict[str, Any] = {
    "name": "faults",
    "preset": "parle",
    "replicas": 1,
    "epochs": 1000,
    "model": {"name": "toy_models:slow_mlp", "options": {"delay": 0.01, "dropout": 0.0}},
    "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
    "optim": {"L": 2},
    "eval": {"every_epochs": 1e12},
    "checkpoint": {"every_rounds": 2},
    "runtime": {"lease_s": 3600.0},
}


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_log_text_is_capped_and_on_one_line() -> None:
    assert capped("worker\nERROR forged line\r\x1b[2J", 100) == "worker\\nERROR forged line\\r\\x1b[2J"
    long = capped("x" * 10_000)
    assert long.startswith("x" * 300) and long.endswith("... (9700 more characters)") and len(long) < 400


@pytest.mark.timeout(60)
def test_a_coordinator_bug_answers_internal_with_a_logged_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry row that lost a key its reader relies on (a damaged state directory, or a bug): the
    KeyError that follows is the coordinator's fault. It used to answer INVALID_ARGUMENT."""
    state = tmp_path / "state"
    with CoordinatorServer(state) as server, JobsClient(Endpoint(server.address)) as client:
        job_id = client.submit(yaml.safe_dump({**SPEC, "model": {"name": "lenet"}}))
        client.cancel(job_id)
    with contextlib.closing(sqlite3.connect(state / "registry.sqlite")) as db, db:
        db.execute("UPDATE jobs SET spec_json = '{}' WHERE id = ?", (job_id,))
    before = metric("parle_internal_errors_total", {"method": "Get"})
    with (
        caplog.at_level(logging.ERROR, logger="coordinator.rpc_guard"),
        CoordinatorServer(state) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Get(pb.GetRequest(job_id=job_id), timeout=10)
        err: Any = raised.value
        assert err.code() == grpc.StatusCode.INTERNAL, err.details()
        assert "Get: internal error (KeyError)" in err.details()
        # the same coordinator still answers what it can: a client error stays the client's
        with pytest.raises(grpc.RpcError) as raised:
            stub.Get(pb.GetRequest(job_id="no-such-job"), timeout=10)
        err = raised.value
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert metric("parle_internal_errors_total", {"method": "Get"}) == before + 1
    tracebacks = [r for r in caplog.records if r.exc_info is not None and r.exc_info[0] is KeyError]
    assert tracebacks and "internal error in Get" in tracebacks[0].getMessage()


# ---------------------------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (another process eating the disk)."""
    filler = directory / "filler"
    block = b"\0" * (64 << 10)
    with filler.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
    while True:  # the last partial block too: not a byte left
        try:
            with filler.open("ab", buffering=0) as f:
                f.write(b"\0" * 512)
        except OSError:
            return filler


@pytest.mark.timeout(240)
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_the_workers_train_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    with tmpfs(state / "jobs", "16m") as jobs_fs, CoordinatorServer(state) as server:
        job_id = server.manager.submit(resolve(SPEC))
        job = server.manager.job(job_id)
        store = CheckpointStore(jobs_fs / job_id / "checkpoints")
        transport = GrpcTransport(server.address, job_id=job_id)
        loop = WorkerLoop(transport, "w0", trust=Trust(("toy_models",)))
        failures: list[BaseException] = []

        def run() -> None:
            try:
                loop.run()
            except BaseException as err:
                failures.append(err)

        worker = threading.Thread(target=run, daemon=True)
        with caplog.at_level(logging.INFO):
            worker.start()
            try:
                wait_for(lambda: store.latest() is not None, "a first checkpoint")
                filler = fill(jobs_fs)
                failed_before = metric("parle_checkpoint_failures_total", {"job_id": job_id})
                kept = store.latest()
                assert kept is not None
                wait_for(
                    lambda: metric("parle_checkpoint_failures_total", {"job_id": job_id}) >= failed_before + 2,
                    "two checkpoints refused by the full disk",
                )
                rounds_while_full = job.round
                newest = store.latest()
                assert newest is not None and newest.round >= kept.round  # the last good one, intact
                assert not [p.name for p in store.directory.iterdir() if p.name.startswith(".tmp")]
                assert not failures and worker.is_alive() and job.state.value == "running"
                filler.unlink()  # the operator frees space: checkpoints resume
                wait_for(
                    lambda: (latest := store.latest()) is not None and latest.round > rounds_while_full,
                    "a checkpoint after the disk has room again",
                )
            finally:
                server.manager.cancel(job_id)
                worker.join(timeout=60)
                transport.close()
        assert not failures, failures  # the worker never saw an error: no UNKNOWN, no INTERNAL
        assert loop.joins == 1  # and never lost its place
        told = [r.getMessage() for r in caplog.records if "checkpoint of round" in r.getMessage()]
        assert told and "No space left on device" in told[0] and "the previous checkpoint is kept" in told[0], told
        assert not any(r.exc_info for r in caplog.records if r.name == "coordinator.rpc_guard"), "no internal errors"
        assert os.path.ismount(jobs_fs)
