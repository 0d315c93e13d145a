"""The coordinator's gRPC server: the ``Coordinator`` service for workers and ``Jobs`` for clients.

Handlers validate before they touch state and answer every refusal with a status code and a message
a person can act on (see parle.proto); a counter of rejections by reason goes up each time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from safetensors.torch import load_file

from coordinator import metrics
from coordinator.auth import TokenInterceptor, server_credentials
from coordinator.checkpoint import CheckpointStore
from coordinator.datachannel import DataChannelServer, server_ssl_context
from coordinator.events import read_events
from coordinator.job import Job
from coordinator.logtext import capped
from coordinator.registry import JobRecord, registry_token
from coordinator.service import MAX_PENDING_JOBS, METRICS_RETENTION_S, RELEASE_AFTER_S, JobManager
from protos import frames
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import (
    MAX_CHUNK_BYTES,
    CodecError,
    CodecTooLarge,
    TensorAssembler,
    TensorSpec,
    encode_tensors,
    wire_bytes,
)
from protos.messages import CoordinatorError, EvalReport, RoundStats
from protos.spec import MAX_REPLICAS, SpecError, parse_yaml, resolve
from protos.wire import (
    COMPRESSION,
    JOB_STATES,
    SPLIT_NAMES,
    SPLITS,
    directives_to_pb,
    expect_end,
    receive_tensors,
    tensor_chunks,
    values_to_pb,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bytes of Exchange and Report uploads held at once, all streams together; one upload larger than this is
# refused from its header, before any of its bytes arrive. Raise it (--max-inflight-bytes) for models
# whose replica state is larger.
MAX_INFLIGHT_BYTES = 2 << 30
# Every chunk but the last of each tensor is "full": the size of the tensor's first chunk, which is at
# least this (senders use MAX_CHUNK_BYTES), so a stream of one-byte chunks cannot eat the coordinator's CPU.
MIN_CHUNK_BYTES = 16 * 1024
# An upload that sends nothing for this long is cancelled and its bytes released.
UPLOAD_IDLE_S = 60.0
# Streams each method serves at once; one more is answered RESOURCE_EXHAUSTED. The thread pool holds all
# of them plus headroom, so unary calls (Heartbeat, Get, Submit, ...) always find a thread.
STREAM_LIMITS: dict[str, int] = {
    "Join": 64,
    "Exchange": 2 * MAX_REPLICAS,
    "Report": 64,
    "FetchModel": 64,
    "Watch": 64,
    "Download": 16,
}
UNARY_HEADROOM = 64
POLL_S = 0.5  # how often a waiting handler checks that its client is still there
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_PAGE_BYTES = 100, 1000, 2 << 20
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),  # ping idle clients: a vanished peer is noticed within a minute
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients ping every 20 s (protos.rpc)
    ("grpc.http2.max_ping_strikes", 3),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
]


def _reject(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    metrics.REJECTED.labels(code.name.lower()).inc()
    log.info("rejected (%s): %s", code.name, capped(message))
    context.abort(code, message)


def _internal(context: grpc.ServicerContext, method: str, err: Exception) -> None:
    """A bug of ours, not the caller's: INTERNAL, with the traceback in the log and a metric to alert on."""
    metrics.INTERNAL_ERRORS.labels(method).inc()
    log.error("internal error in %s", method, exc_info=err)
    context.abort(
        grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(err).__name__}); the coordinator logged it"
    )


def guarded(handler: Callable[..., T]) -> Callable[..., T]:
    """Map the project's errors to gRPC status codes (unary and streaming handlers alike).

    Only the typed errors that validation raises are the client's fault: ``CoordinatorError`` (its own
    code), ``CodecError`` and ``SpecError`` (INVALID_ARGUMENT; too large: RESOURCE_EXHAUSTED). Anything
    else, a ValueError or KeyError included, is a bug of the coordinator's and answers INTERNAL."""
    method = handler.__name__

    def translate(context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, CoordinatorError):
            _reject(context, grpc.StatusCode[err.code], str(err))
        elif isinstance(err, CodecTooLarge):
            _reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        elif isinstance(err, (CodecError, SpecError)):
            _reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        elif isinstance(err, grpc.RpcError) or context.code() is not None:
            raise err  # the client went away mid-stream, or the call was already aborted: nothing to answer
        else:
            _internal(context, method, err)
        raise err

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = handler(self, request, context)
            if isinstance(result, Iterator):
                return _guard_stream(result, context, translate)
            return result
        except Exception as err:
            translate(context, err)
            raise

    return wrapper


def _guard_stream(stream: Iterator[T], context: grpc.ServicerContext, translate: Callable[..., None]) -> Iterator[T]:
    try:
        yield from stream
    except Exception as err:
        translate(context, err)
        raise


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CoordinatorError("INVALID_ARGUMENT", message)


class StreamLimits:
    """At most ``limits[method]`` calls of each streaming method at once; the next is RESOURCE_EXHAUSTED.

    A slot is held while the handler runs (its thread is busy), released when it returns or its
    response stream is closed."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = dict(limits)
        self._open = dict.fromkeys(limits, 0)
        self._lock = threading.Lock()

    def open(self, method: str) -> int:
        with self._lock:
            return self._open[method]

    def enter(self, method: str) -> None:
        with self._lock:
            if self._open[method] >= self.limits[method]:
                raise CoordinatorError(
                    "RESOURCE_EXHAUSTED",
                    f"{method}: {self.limits[method]} calls are open, the most this coordinator serves at once; "
                    "retry later",
                )
            self._open[method] += 1
            metrics.OPEN_STREAMS.labels(method).set(self._open[method])

    def leave(self, method: str) -> None:
        with self._lock:
            self._open[method] -= 1
            metrics.OPEN_STREAMS.labels(method).set(self._open[method])


def limited(method: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Hold one of ``self.streams``' slots for ``method`` while the handler (or its response stream) runs."""

    def decorate(handler: Callable[..., T]) -> Callable[..., T]:
        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
                self.streams.enter(method)
                try:
                    yield from handler(self, request, context)
                finally:
                    self.streams.leave(method)

            return stream

        @functools.wraps(handler)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            self.streams.enter(method)
            try:
                return handler(self, request, context)
            finally:
                self.streams.leave(method)

        return unary

    return decorate


class ByteBudget:
    """One budget of upload bytes held at once (Exchange and Report together). An upload reserves what its
    header declares before its first chunk is read; one that can never fit is refused at once, one that
    does not fit now waits (at most ``wait_s``) for others to finish."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str, wait_s: float, context: grpc.ServicerContext) -> Iterator[None]:
        if nbytes > self.limit:
            raise CoordinatorError(
                "RESOURCE_EXHAUSTED",
                f"{what} declares {nbytes} bytes, more than this coordinator holds in flight ({self.limit} bytes; "
                "see --max-inflight-bytes)",
            )
        give_up = time.monotonic() + wait_s
        with self._cond:
            while self.held + nbytes > self.limit:
                left = give_up - time.monotonic()
                if left <= 0 or not context.is_active():
                    raise CoordinatorError(
                        "RESOURCE_EXHAUSTED",
                        f"{what}: {self.held} of {self.limit} upload bytes are in flight; retry later",
                    )
                self._cond.wait(min(left, POLL_S))
            self.held += nbytes
            metrics.INFLIGHT_BYTES.set(self.held)
        try:
            yield
        finally:
            with self._cond:
                self.held -= nbytes
                metrics.INFLIGHT_BYTES.set(self.held)
                self._cond.notify_all()


class _Upload:
    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.last = time.monotonic()
        self.stalled = False


class UploadWatch:
    """Cancels client streams that send nothing for ``idle_s`` seconds (a stalled upload must not keep a
    thread, a stream slot and its share of the byte budget), and checks chunk sizes on the way."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._uploads: set[_Upload] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upload-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            cutoff = time.monotonic() - self.idle_s
            with self._lock:
                stalled = [u for u in self._uploads if u.last < cutoff and not u.stalled]
            for upload in stalled:
                upload.stalled = True
                metrics.REJECTED.labels("stalled").inc()
                log.info("cancelling an upload that sent nothing for %.0fs", self.idle_s)
                upload.context.cancel()

    @contextlib.contextmanager
    def watch(self, context: grpc.ServicerContext) -> Iterator[_Upload]:
        upload = _Upload(context)
        with self._lock:
            self._uploads.add(upload)
        try:
            yield upload
        finally:
            with self._lock:
                self._uploads.discard(upload)

    def messages(self, upload: _Upload, stream: Iterator[T]) -> Iterator[T]:
        """``stream``'s messages, each one renewing the upload's idle clock."""
        try:
            for message in stream:
                upload.last = time.monotonic()
                yield message
        except grpc.RpcError:
            if not upload.stalled:
                raise CoordinatorError("CANCELLED", "the client cancelled its upload") from None
        if upload.stalled:
            raise CoordinatorError("DEADLINE_EXCEEDED", f"upload sent nothing for {self.idle_s:.0f}s: cancelled")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def declared_bytes(headers: Sequence[pb.TensorHeader], limit: int, what: str) -> int:
    """The bytes ``headers`` announce. Beyond ``limit`` this raises what the codec says of them (a header
    inconsistent with its shape is INVALID_ARGUMENT; a consistent set beyond the limit RESOURCE_EXHAUSTED),
    before any buffer exists."""
    total = sum(h.total_bytes for h in headers)
    if total > limit:
        TensorAssembler(headers, max_total_bytes=limit, context=what)
        raise CodecTooLarge(f"{what}: the tensor set has {total} bytes, more than the limit of {limit}")
    return total


def full_chunks(headers: Sequence[pb.TensorHeader], messages: Iterator[Any], context: str) -> Iterator[Any]:
    """Pass ``messages`` through, refusing a chunk plan of small chunks: every chunk but the last of each
    tensor must be as large as the tensor's first chunk, and that at least ``MIN_CHUNK_BYTES``."""
    for index, h in enumerate(headers):
        most = max(1, math.ceil(h.total_bytes / MIN_CHUNK_BYTES))
        if h.num_chunks > most:
            raise CodecError(
                f"{context}: tensor {h.name!r} (index {index}) announces {h.num_chunks} chunks for {h.total_bytes} "
                f"bytes; chunks other than the last must hold at least {MIN_CHUNK_BYTES} bytes"
            )
    first: dict[int, int] = {}
    for message in messages:
        if message.WhichOneof("payload") == "chunk":
            chunk = message.chunk
            index = chunk.tensor_index
            if index < len(headers) and chunk.chunk_index + 1 < headers[index].num_chunks:
                size = first.setdefault(index, len(chunk.data))
                if len(chunk.data) < min(size, MAX_CHUNK_BYTES) or size < MIN_CHUNK_BYTES:  # larger: the codec
                    raise CodecError(
                        f"{context}: chunk {chunk.chunk_index} of tensor {headers[index].name!r} has "
                        f"{len(chunk.data)} bytes; every chunk but the last must be full ({size} bytes, at least "
                        f"{MIN_CHUNK_BYTES})"
                    )
        yield message


class Limits:
    """What both services share: stream slots, the upload byte budget and watch, and the stop flag."""

    def __init__(
        self,
        stream_limits: dict[str, int] | None = None,
        inflight_bytes: int = MAX_INFLIGHT_BYTES,
        upload_idle_s: float = UPLOAD_IDLE_S,
    ) -> None:
        self.streams = StreamLimits(stream_limits or STREAM_LIMITS)
        self.budget = ByteBudget(inflight_bytes)
        self.uploads = UploadWatch(upload_idle_s)
        self.stopping = threading.Event()

    def check_open(self) -> None:
        if self.stopping.is_set():
            raise CoordinatorError("UNAVAILABLE", "the coordinator is shutting down; retry when it is back")

    def wait(
        self, context: grpc.ServicerContext, step: Callable[[float], T], total_s: float | None = None, what: str = ""
    ) -> T:
        """Run ``step(timeout)`` (a wait that raises DEADLINE_EXCEEDED when ``timeout`` passes) in short steps,
        ending when the client goes away or the coordinator stops; ``total_s``: the overall limit."""
        give_up = None if total_s is None else time.monotonic() + total_s
        while True:
            self.check_open()
            if not context.is_active():
                raise CoordinatorError("CANCELLED", f"the client went away while waiting for {what}")
            step_s = POLL_S if give_up is None else min(POLL_S, max(give_up - time.monotonic(), 0.0))
            try:
                return step(step_s)
            except CoordinatorError as err:
                if err.code != "DEADLINE_EXCEEDED":
                    raise
            if give_up is not None and time.monotonic() >= give_up:
                raise CoordinatorError("DEADLINE_EXCEEDED", f"{what} was not ready in {total_s}s")

    def close(self) -> None:
        self.stopping.set()
        self.uploads.close()


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self, manager: JobManager, limits: Limits | None = None, data: DataChannelServer | None = None
    ) -> None:
        self.manager = manager
        self.limits = limits or Limits()
        self.streams = self.limits.streams
        self.data = data  # offered in Join replies to workers that ask for it

    def _member_job(self, job_id: str, worker_id: str) -> Job:
        _require(bool(worker_id), "worker_id is empty: call Join first")
        job = self.manager.job(job_id)
        job.check_member(worker_id)
        return job

    @guarded
    @limited("Join")
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.JoinChunk]:
        self.limits.check_open()
        _require(bool(request.worker_name.strip()), "worker_name is empty")
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
            _require(
                first is not None and first.WhichOneof("payload") == "upload",
                "Exchange must start with an upload header",
            )
            assert first is not None
            up = first.upload
            job = self._member_job(up.job_id, up.worker_id)
            _require(len(up.tensors) == 1, f"expected one tensor (the coupled average), got {len(up.tensors)}")
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
                reply = job.report(up.worker_id, up.round, tensors.popitem()[1], stats)
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
            _require(first is not None and first.WhichOneof("payload") == "header", "Report must start with a header")
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
                        _require(e.split in SPLIT_NAMES, f"eval split {e.split} is not train, validation or test")
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


_STATE_NAMES = {v: k for k, v in JOB_STATES.items()}


def job_info(manager: JobManager, record: JobRecord) -> pb.JobInfo:
    spec = json.loads(record.spec_json)
    info = pb.JobInfo(
        id=record.id,
        name=record.name,
        state=JOB_STATES[record.state],
        round=record.round,
        replicas=spec["replicas"],
        created_unix_seconds=record.created,
        updated_unix_seconds=record.updated,
        message=record.message,
        spec_json=record.spec_json,
    )
    with contextlib.suppress(CoordinatorError):
        job = manager.job(record.id)
        info.state = JOB_STATES[job.state.value]
        info.round = job.round
        if job.schedule is not None:  # known once the first worker said how large its data set is
            info.total_rounds = job.schedule.total_rounds
            info.epoch = job.schedule.epoch(job.round)
        info.live_workers = job.live_workers
        if job.last_train_loss is not None:
            info.last_train_loss = job.last_train_loss
        if job.last_test_error is not None:
            info.last_test_error = job.last_test_error
        return info
    for event in read_events(manager.job_dir(record.id) / "metrics.jsonl"):  # a job from an earlier run
        if event.get("kind") == "round":
            info.last_train_loss, info.epoch = event["train_loss"], event["epoch"]
        elif event.get("kind") == "eval" and event.get("split") == "test":
            info.last_test_error = event["error"]
    return info


def _event_to_pb(job_id: str, event: dict[str, Any]) -> pb.JobEvent | None:
    out = pb.JobEvent(job_id=job_id, unix_seconds=time.time())
    kind = event.get("kind")
    if kind == "round":
        out.round.CopyFrom(
            pb.RoundEvent(
                round=event["round"],
                epoch=event["epoch"],
                train_loss=event["train_loss"],
                contributors=event["workers"],
                round_seconds=event["round_seconds"],
                values=pb.RoundValues(round=event["round"], gamma=event["gamma"], rho=event["rho"], lr=event["lr"]),
            )
        )
    elif kind == "eval":
        result = pb.EvalResult(
            round=event["round"], split=SPLITS[event["split"]], loss=event["loss"], error=event["error"]
        )
        out.eval.CopyFrom(pb.EvalEvent(result=result))
    elif kind == "state":
        out.state.CopyFrom(pb.StateEvent(state=JOB_STATES[event["state"]], message=event["message"]))
    else:
        return None
    return out


class JobsServicer(pb_grpc.JobsServicer):
    def __init__(self, manager: JobManager, limits: Limits | None = None) -> None:
        self.manager = manager
        self.limits = limits or Limits()
        self.streams = self.limits.streams

    @guarded
    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SubmitReply:
        self.limits.check_open()
        # Size, nesting and aliases are checked on the text, before anything is built (an alias bomb).
        spec = resolve(parse_yaml(request.spec_yaml, "spec"))
        job_id = self.manager.submit(spec)
        return pb.SubmitReply(job_id=job_id, spec_json=json.dumps(spec.to_dict()))

    @guarded
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        return job_info(self.manager, self.manager.record(request.job_id))

    @guarded
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        """Newest first, one page at a time: ``page_size`` jobs at most (and about ``MAX_PAGE_BYTES``);
        ``next_page_token`` continues after the page's last job. ``limit`` alone: the newest N, one page."""
        size = min(request.page_size or request.limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if request.limit:
            size = min(size, request.limit)
        states = [_STATE_NAMES[s] for s in request.states if s in _STATE_NAMES]
        if request.states and not states:
            return pb.ListReply()
        try:
            records = self.manager.registry.page(states, request.page_token or None, size + 1)
        except ValueError:
            raise CoordinatorError("INVALID_ARGUMENT", "page_token is not one this coordinator gave out") from None
        reply, used = pb.ListReply(), 0
        for record in records[:size]:
            info = job_info(self.manager, record)
            used += info.ByteSize()
            if reply.jobs and used > MAX_PAGE_BYTES:
                break
            reply.jobs.append(info)
        more = len(reply.jobs) < len(records)
        if more and not request.limit:
            reply.next_page_token = registry_token(records[len(reply.jobs) - 1])
        return reply

    @guarded
    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        self.manager.cancel(request.job_id)
        return pb.CancelReply(job=job_info(self.manager, self.manager.record(request.job_id)))

    @guarded
    @limited("Watch")
    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        events = self.manager.watch(request.job_id)
        try:
            snapshot = job_info(self.manager, self.manager.record(request.job_id))
            yield pb.JobEvent(job_id=request.job_id, unix_seconds=time.time(), snapshot=snapshot)
            terminal = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
            if snapshot.state in terminal:
                return
            while context.is_active():
                with contextlib.suppress(queue.Empty):
                    event = events.get(timeout=1.0)
                    if event is None:
                        return
                    message = _event_to_pb(request.job_id, event)
                    if message is not None:
                        yield message
                        if message.WhichOneof("event") == "state" and message.state.state in terminal:
                            return
        finally:
            self.manager.unwatch(request.job_id, events)

    @guarded
    @limited("Download")
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        self.manager.record(request.job_id)
        job_dir = self.manager.job_dir(request.job_id)
        what = request.what or pb.ARTIFACT_REFERENCE
        manifest: dict[str, Any] = {}
        if what == pb.ARTIFACT_METRICS:
            log_file = job_dir / "metrics.jsonl"
            events = log_file.read_text() if log_file.is_file() else ""
            yield pb.DownloadChunk(header=pb.DownloadHeader(job_id=request.job_id, what=what, events_jsonl=events))
            return
        if what == pb.ARTIFACT_MODEL:
            tensors = _load_if(job_dir / "final.safetensors", "the job has not exported a model yet")
        elif what == pb.ARTIFACT_REFERENCE and (job_dir / "reference.safetensors").is_file():
            tensors = load_file(str(job_dir / "reference.safetensors"))
        else:
            ckpt = CheckpointStore(job_dir / "checkpoints").latest()
            if ckpt is None:
                raise CoordinatorError("FAILED_PRECONDITION", f"job {request.job_id} has no checkpoint yet")
            manifest = ckpt.meta
            tensors = {"reference": ckpt.tensors["reference"]} if what == pb.ARTIFACT_REFERENCE else ckpt.tensors
        encoded = encode_tensors(sorted(tensors.items()), request.compression or pb.COMPRESSION_NONE)
        header = pb.DownloadHeader(
            job_id=request.job_id,
            round=int(manifest.get("round", 0)),
            what=what,
            manifest_json=json.dumps(manifest),
            tensors=encoded.headers,
        )
        yield pb.DownloadChunk(header=header)
        yield from tensor_chunks(encoded.chunks, pb.DownloadChunk)


def _load_if(path: Path, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise CoordinatorError("FAILED_PRECONDITION", missing)
    return load_file(str(path))


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
