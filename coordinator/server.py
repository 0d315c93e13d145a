"""The coordinator's gRPC server: the ``Coordinator`` service for workers (join, exchange, heartbeat, leave,
report, fetch the model) and, from jobs_service.py, ``Jobs`` for clients.

Handlers validate before they touch state and answer every refusal with a status code and a message
a person can act on (see parle.proto); a counter of rejections by reason goes up each time. Limits:
rpc_limits.py; how errors become statuses: rpc_guard.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc

from coordinator import metrics
from coordinator.auth import TokenInterceptor, server_credentials
from coordinator.datachannel import DataChannelServer, server_ssl_context
from coordinator.job import Job
from coordinator.jobs_service import JobsServicer
from coordinator.rpc_guard import guarded, require
from coordinator.rpc_limits import (
    MAX_INFLIGHT_BYTES,
    UNARY_HEADROOM,
    UPLOAD_IDLE_S,
    Limits,
    declared_bytes,
    full_chunks,
    limited,
)
from coordinator.service import MAX_PENDING_JOBS, METRICS_RETENTION_S, RELEASE_AFTER_S, JobManager
from protos import frames
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import (
    TensorSpec,
    encode_tensors,
    wire_bytes,
)
from protos.messages import EvalReport, RoundStats
from protos.wire import (
    COMPRESSION,
    JOB_STATES,
    SPLIT_NAMES,
    directives_to_pb,
    expect_end,
    receive_tensors,
    tensor_chunks,
    values_to_pb,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # ping idle clients: a vanished peer is noticed within a minute
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients ping every 20 s (protos.rpc)
    ("grpc.http2.max_ping_strikes", 3),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
]


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self, manager: JobManager, limits: Limits | None = None, data: DataChannelServer | None = None
    ) -> None:
        self.manager = manager
        self.limits = limits or Limits()
        self.streams = self.limits.streams
        self.data = data  # offered in Join replies to workers that ask for it

    def _member_job(self, job_id: str, worker_id: str) -> Job:
        require(bool(worker_id), "worker_id is empty: call Join first")
        job = self.manager.job(job_id)
        job.check_member(worker_id)
        return job

    @guarded
    @limited("Join")
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.JoinChunk]:
        self.limits.check_open()
        require(bool(request.worker_name.strip()), "worker_name is empty")
        job = self.manager.assign(request.job_id or None)
        want = request.replica_index if request.HasField("replica_index") else None
        resume_round = request.resume_round if request.HasField("resume_round") else None
        grant = job.join(request.worker_name[:200], request.device[:40] or "cpu", want, resume_round)
        if grant.resume:
            start, named = pb.START_KIND_OWN_STATE, []
        elif grant.replica_state is not None:
            start, named = pb.START_KIND_REPLICA_STATE, sorted(grant.replica_state.items())
        elif grant.start is not None:
            start, named = pb.START_KIND_REFERENCE, [("reference", grant.start)]
        else:
            start, named = pb.START_KIND_FRESH, []
        encoded = encode_tensors(named)
        metrics.EXCHANGE_BYTES.labels("down").inc(wire_bytes(encoded.headers))
        header = pb.JoinHeader(
            worker_id=grant.worker_id,
            job_id=grant.job_id,
            replica_index=grant.replica,
            spec_json=json.dumps(grant.spec.to_dict()),
            round_values=values_to_pb(grant.values),
            lease_seconds=grant.spec.runtime.lease_s,
            start=start,
            tensors=encoded.headers,
            upload_compression=COMPRESSION[grant.spec.runtime.compression],
            seed_center=grant.seed_center,
            resume_duties=directives_to_pb(grant.resume_duties),
        )
        if self.data is not None and frames.FEATURE in request.capabilities.features:
            header.data_port = self.data.port
            header.data_ticket = self.data.tickets.issue(grant.job_id, grant.worker_id)
        yield pb.JoinChunk(header=header)
        yield from tensor_chunks(encoded.chunks, pb.JoinChunk)

    @guarded
    @limited("Exchange")
    def Exchange(
        self, request_iterator: Iterator[pb.ExchangeChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.ExchangeChunk]:
        with self.limits.uploads.watch(context) as watched:
            messages = self.limits.uploads.messages(watched, request_iterator)
            self.limits.check_open()
            first = next(messages, None)
            require(
                first is not None and first.WhichOneof("payload") == "upload",
                "Exchange must start with an upload header",
            )
            assert first is not None
            up = first.upload
            job = self._member_job(up.job_id, up.worker_id)
            require(len(up.tensors) == 1, f"expected one tensor (the coupled average), got {len(up.tensors)}")
            expected = None if job.center is None else {up.tensors[0].name: TensorSpec.of(job.center)}
            what = f"coupled average from {up.worker_id}, round {up.round}"
            stats = RoundStats(up.train_loss, up.inner_steps, up.samples, up.chain_seconds, up.train_size)
            # The upload's bytes count against the coordinator's one budget from its header on, and each
            # decoded average is freed once added to the running sum: memory grows with the model, not with
            # workers x model.
            nbytes = declared_bytes(up.tensors, self.limits.budget.limit, what)
            with self.limits.budget.hold(nbytes, what, self.limits.uploads.idle_s, context):
                chunks = full_chunks(up.tensors, messages, what)
                tensors = receive_tensors(up.tensors, chunks, expected=expected, context=what)
                expect_end(chunks, what)  # NaN/Inf: Job.report checks, once
                # donated: decoded into fresh memory that nothing else refers to, so the round may keep it
                reply = job.report(up.worker_id, up.round, tensors.popitem()[1], stats, donated=True)
        metrics.EXCHANGE_BYTES.labels("up").inc(wire_bytes(up.tensors))
        if reply is None:
            worker_id, round_ = up.worker_id, up.round
            reply = self.limits.wait(
                context, lambda t: job.await_round(worker_id, round_, t), what=f"the close of round {round_}"
            )
        encoded = encode_tensors([("reference", reply.reference)], COMPRESSION[job.spec.runtime.compression])
        metrics.EXCHANGE_BYTES.labels("down").inc(wire_bytes(encoded.headers))
        down = pb.ExchangeDownload(
            closed_round=reply.closed_round,
            next=values_to_pb(reply.next_values),
            directives=directives_to_pb(reply.directives),
            tensors=encoded.headers,
        )
        yield pb.ExchangeChunk(download=down)
        yield from tensor_chunks(encoded.chunks, pb.ExchangeChunk)

    @guarded
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        job = self._member_job(request.job_id, request.worker_id)
        running = job.heartbeat(request.worker_id)
        return pb.HeartbeatReply(
            lease_seconds=job.spec.runtime.lease_s, job_state=JOB_STATES[job.state.value], stop=not running
        )

    @guarded
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        job = self._member_job(request.job_id, request.worker_id)
        if request.failed:
            job.fail(request.worker_id, request.reason[:2000] or f"worker {request.worker_id} failed")
        job.leave(request.worker_id)
        return pb.LeaveReply(was_member=True)

    @guarded
    @limited("Report")
    def Report(self, request_iterator: Iterator[pb.ReportChunk], context: grpc.ServicerContext) -> pb.ReportReply:
        with self.limits.uploads.watch(context) as watched:
            messages = self.limits.uploads.messages(watched, request_iterator)
            first = next(messages, None)
            require(first is not None and first.WhichOneof("payload") == "header", "Report must start with a header")
            assert first is not None
            head = first.header
            job = self._member_job(head.job_id, head.worker_id)
            what = f"report from {head.worker_id}, round {head.round}"
            nbytes = declared_bytes(head.tensors, self.limits.budget.limit, what)
            with self.limits.budget.hold(nbytes, what, self.limits.uploads.idle_s, context):
                chunks = full_chunks(head.tensors, messages, what)
                replica = head.state_kind in (pb.STATE_KIND_REPLICA, pb.STATE_KIND_OFFER)
                tensors = receive_tensors(head.tensors, chunks, require_finite=replica, context=what)
                expect_end(chunks, what)
                if head.state_kind == pb.STATE_KIND_REPLICA:
                    job.report_state(head.worker_id, head.round, tensors)
                elif head.state_kind == pb.STATE_KIND_OFFER:
                    job.offer_state(head.worker_id, head.round, tensors)
                if head.evals or head.state_kind == pb.STATE_KIND_MODEL:
                    for e in head.evals:
                        require(e.split in SPLIT_NAMES, f"eval split {e.split} is not train, validation or test")
                    results = {SPLIT_NAMES[e.split]: (e.loss, e.error) for e in head.evals}
                    model = tensors if head.state_kind == pb.STATE_KIND_MODEL else None
                    job.report_eval(head.worker_id, EvalReport(head.round, head.stats.epoch, results, model))
        return pb.ReportReply(stored=True)

    @guarded
    @limited("FetchModel")
    def FetchModel(self, request: pb.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        job = self._member_job(request.job_id, request.worker_id)
        model = self.limits.wait(
            context,
            lambda t: job.fetch_model(request.worker_id, request.round, t),
            job.spec.optim.round_deadline_s,
            what=f"the model of round {request.round}",
        )
        encoded = encode_tensors([("model", model)])
        metrics.EXCHANGE_BYTES.labels("down").inc(wire_bytes(encoded.headers))
        header = pb.DownloadHeader(job_id=request.job_id, round=request.round, tensors=encoded.headers)
        yield pb.DownloadChunk(header=header)
        yield from tensor_chunks(encoded.chunks, pb.DownloadChunk)


class CoordinatorServer:
    """A running gRPC server around a ``JobManager``. ``port`` is the bound port (give 0 for any)."""

    def __init__(
        self,
        state_dir: Path,
        listen: str = "127.0.0.1:0",
        token: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        *,
        worker_token: str | None = None,
        client_token: str | None = None,
        stream_limits: dict[str, int] | None = None,
        inflight_bytes: int = MAX_INFLIGHT_BYTES,
        upload_idle_s: float = UPLOAD_IDLE_S,
        max_pending_jobs: int = MAX_PENDING_JOBS,
        release_after_s: float = RELEASE_AFTER_S,
        metrics_retention_s: float = METRICS_RETENTION_S,
        data_channel: bool = True,
        data_port: int = 0,
    ) -> None:
        self.manager = JobManager(
            state_dir,
            listeners=lambda job_id: [metrics.JobMetrics(job_id)],
            max_pending=max_pending_jobs,
            release_after_s=release_after_s,
            metrics_retention_s=metrics_retention_s,
        )
        self.limits = Limits(stream_limits, inflight_bytes, upload_idle_s)
        secured = bool(token or worker_token or client_token)
        interceptors = [TokenInterceptor(token, worker=worker_token, client=client_token)] if secured else []
        # Every stream a method may hold at once, plus headroom: a Heartbeat never waits for a thread.
        threads = sum(self.limits.streams.limits.values()) + UNARY_HEADROOM
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=KEEPALIVE_OPTIONS,
            maximum_concurrent_rpcs=2 * threads,
        )
        creds = server_credentials(tls_cert, tls_key)
        host = listen.rsplit(":", 1)[0]
        # The data channel (coordinator/datachannel.py): the same interface as gRPC, a port of its own.
        self.data = (
            DataChannelServer(
                self.manager,
                self.limits,
                host,
                data_port,
                worker_token=(worker_token or token) if secured else None,
                ssl_context=server_ssl_context(tls_cert, tls_key),
            )
            if data_channel
            else None
        )
        pb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorServicer(self.manager, self.limits, self.data), self.server
        )
        pb_grpc.add_JobsServicer_to_server(JobsServicer(self.manager, self.limits), self.server)
        self.port = self.server.add_secure_port(listen, creds) if creds else self.server.add_insecure_port(listen)
        if self.port == 0:
            if self.data is not None:
                self.data.close()
            raise OSError(f"--listen {listen}: could not bind")
        self.address = f"{host}:{self.port}"
        self.server.start()
        self._closed = False
        log.info(
            "coordinator listening on %s (%s, %s); data channel %s",
            self.address,
            "TLS" if creds else "plaintext",
            "tokens required" if secured else "no token",
            f"on port {self.data.port}" if self.data is not None else "off",
        )

    def wait(self) -> None:
        self.server.wait_for_termination()

    def close(self, grace: float = 2.0) -> None:
        """Stop taking work, checkpoint the running jobs, wake and end every waiting call, then stop."""
        if self._closed:
            return
        self._closed = True
        self.limits.close()  # new Join, Exchange and Submit calls are refused from here on
        self.manager.checkpoint_all()
        self.manager.close_jobs()  # wakes handlers waiting on a round or a model; they answer UNAVAILABLE
        if self.data is not None:
            self.data.close()
        self.server.stop(grace).wait()
        self.manager.close()

    def __enter__(self) -> CoordinatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
