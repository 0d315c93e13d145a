"""Runs the shared transport suite (tests/transport_suite.py) against every worker transport."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from transport_suite import CHECKS, Harness

from coordinator.job import Job
from coordinator.server import CoordinatorServer
from protos.spec import JobSpec
from worker.transports import WorkerTransport
from worker.transports.grpc import GrpcTransport
from worker.transports.inprocess import InProcessTransport


class InProcessHarness:
    def __init__(self, root: Path) -> None:
        self.root, self.count = root, itertools.count()

    def open_job(self, spec: JobSpec) -> Job:
        job_id = f"job{next(self.count)}"
        return Job(job_id, spec, self.root / job_id)

    def transport(self, job: Job) -> WorkerTransport:
        return InProcessTransport(job, timeout_s=30)


class GrpcHarness:
    """``data_channel``: exchanges go over the coordinator's data channel (the default), else over gRPC
    Exchange streams (what a worker falls back to when the data channel cannot connect)."""

    def __init__(self, server: CoordinatorServer, data_channel: bool) -> None:
        self.server = server
        self.data_channel = data_channel
        self.transports: list[GrpcTransport] = []

    def open_job(self, spec: JobSpec) -> Job:
        return self.server.manager.job(self.server.manager.submit(spec))

    def transport(self, job: Job) -> WorkerTransport:
        t = GrpcTransport(self.server.address, job_id=job.job_id, timeout_s=30, data_channel=self.data_channel)
        self.transports.append(t)
        return t


@pytest.fixture(params=["inprocess", "grpc-data-channel", "grpc-streams"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "inprocess":
        yield InProcessHarness(tmp_path)
        return
    with CoordinatorServer(tmp_path / "state") as server:
        h = GrpcHarness(server, data_channel=request.param == "grpc-data-channel")
        yield h
        exchanged = sum(t.data_exchanges for t in h.transports)
        for t in h.transports:
            t.channel.close()
    # Each path really carried the rounds it claims: the data channel all of them, the streams none.
    if h.data_channel:
        assert exchanged > 0 and not any(t._data_warned for t in h.transports)
    else:
        assert exchanged == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_transport(harness: Harness, check: Callable[[Harness], None]) -> None:
    check(harness)
