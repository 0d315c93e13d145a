"""The coordinator's gRPC server: the ``Coordinator`` service for workers and ``Jobs`` for clients.

Handlers validate before they touch state and answer every refusal with a status code and a message
a person can act on (see parle.proto); a counter of rejections by reason goes up each time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from safetensors.torch import load_file

from coordinator import metrics
from coordinator.auth import TokenInterceptor, server_credentials
from coordinator.checkpoint import CheckpointStore
from coordinator.events import read_events
from coordinator.job import Job
from coordinator.registry import JobRecord
from coordinator.service import JobManager
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import CodecError, CodecTooLarge, TensorSpec, encode_tensors, wire_bytes
from protos.messages import CoordinatorError, EvalReport, RoundStats
from protos.spec import SpecError, resolve
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
MAX_UPLOAD_BYTES = 8 << 30  # a coupled average or replica state larger than this is refused


def _reject(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    metrics.REJECTED.labels(code.name.lower()).inc()
    log.info("rejected (%s): %s", code.name, message)
    context.abort(code, message)


def guarded(handler: Callable[..., T]) -> Callable[..., T]:
    """Map the project's errors to gRPC status codes (unary and streaming handlers alike)."""

    def translate(context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, CoordinatorError):
            _reject(context, grpc.StatusCode[err.code], str(err))
        elif isinstance(err, CodecTooLarge):
            _reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        elif isinstance(err, (CodecError, SpecError, ValueError, KeyError)):
            _reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
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


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, manager: JobManager, concurrent_uploads: int = 4) -> None:
        self.manager = manager
        self.upload_slots = threading.BoundedSemaphore(concurrent_uploads)

    def _member_job(self, job_id: str, worker_id: str) -> Job:
        _require(bool(worker_id), "worker_id is empty: call Join first")
        job = self.manager.job(job_id)
        job.check_member(worker_id)
        return job

    @guarded
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.JoinChunk]:
        _require(bool(request.worker_name.strip()), "worker_name is empty")
        job = self.manager.assign(request.job_id or None)
        want = request.replica_index if request.HasField("replica_index") else None
        grant = job.join(request.worker_name, request.device or "cpu", want)
        if grant.replica_state is not None:
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
        )
        yield pb.JoinChunk(header=header)
        yield from tensor_chunks(encoded.chunks, pb.JoinChunk)

    @guarded
    def Exchange(
        self, request_iterator: Iterator[pb.ExchangeChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.ExchangeChunk]:
        first = next(request_iterator, None)
        _require(
            first is not None and first.WhichOneof("payload") == "upload", "Exchange must start with an upload header"
        )
        assert first is not None
        up = first.upload
        job = self._member_job(up.job_id, up.worker_id)
        _require(len(up.tensors) == 1, f"expected one tensor (the coupled average), got {len(up.tensors)}")
        expected = None if job.center is None else {up.tensors[0].name: TensorSpec.of(job.center)}
        context = f"coupled average from {up.worker_id}, round {up.round}"
        stats = RoundStats(up.train_loss, up.inner_steps, up.samples, up.chain_seconds, up.train_size)
        # At most a few uploads are decoded at once and each is freed once added to the running sum:
        # coordinator memory grows with the model, not with workers x model.
        with self.upload_slots:
            tensors = receive_tensors(
                up.tensors,
                request_iterator,
                expected=expected,
                max_total_bytes=MAX_UPLOAD_BYTES,
                context=context,
            )
            expect_end(request_iterator, context)  # NaN/Inf: Job.report checks, once
            reply = job.report(up.worker_id, up.round, tensors.popitem()[1], stats)
        metrics.EXCHANGE_BYTES.labels("up").inc(wire_bytes(up.tensors))
        if reply is None:
            reply = job.await_round(up.worker_id, up.round)
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
            job.fail(request.worker_id, request.reason or f"worker {request.worker_id} failed")
        job.leave(request.worker_id)
        return pb.LeaveReply(was_member=True)

    @guarded
    def Report(self, request_iterator: Iterator[pb.ReportChunk], context: grpc.ServicerContext) -> pb.ReportReply:
        first = next(request_iterator, None)
        _require(first is not None and first.WhichOneof("payload") == "header", "Report must start with a header")
        assert first is not None
        head = first.header
        job = self._member_job(head.job_id, head.worker_id)
        tensors = receive_tensors(
            head.tensors,
            request_iterator,
            require_finite=head.state_kind == pb.STATE_KIND_REPLICA,
            max_total_bytes=MAX_UPLOAD_BYTES,
            context=f"report from {head.worker_id}, round {head.round}",
        )
        expect_end(request_iterator, f"report from {head.worker_id}, round {head.round}")
        if head.state_kind == pb.STATE_KIND_REPLICA:
            job.report_state(head.worker_id, head.round, tensors)
        if head.evals or head.state_kind == pb.STATE_KIND_MODEL:
            for e in head.evals:
                _require(e.split in SPLIT_NAMES, f"eval split {e.split} is not train, validation or test")
            results = {SPLIT_NAMES[e.split]: (e.loss, e.error) for e in head.evals}
            model = tensors if head.state_kind == pb.STATE_KIND_MODEL else None
            job.report_eval(head.worker_id, EvalReport(head.round, head.stats.epoch, results, model))
        return pb.ReportReply(stored=True)

    @guarded
    def FetchModel(self, request: pb.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        job = self._member_job(request.job_id, request.worker_id)
        model = job.fetch_model(request.worker_id, request.round, job.spec.optim.round_deadline_s)
        encoded = encode_tensors([("model", model)])
        metrics.EXCHANGE_BYTES.labels("down").inc(wire_bytes(encoded.headers))
        header = pb.DownloadHeader(job_id=request.job_id, round=request.round, tensors=encoded.headers)
        yield pb.DownloadChunk(header=header)
        yield from tensor_chunks(encoded.chunks, pb.DownloadChunk)


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
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    @guarded
    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SubmitReply:
        try:
            raw = yaml.safe_load(request.spec_yaml)
        except yaml.YAMLError as err:
            raise CoordinatorError("INVALID_ARGUMENT", f"spec is not valid YAML: {err}") from None
        spec = resolve(raw)
        job_id = self.manager.submit(spec)
        return pb.SubmitReply(job_id=job_id, spec_json=json.dumps(spec.to_dict()))

    @guarded
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        return job_info(self.manager, self.manager.record(request.job_id))

    @guarded
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        infos = [job_info(self.manager, r) for r in self.manager.list()]
        if request.states:
            infos = [i for i in infos if i.state in request.states]
        if request.limit:
            infos = infos[: request.limit]  # newest first
        return pb.ListReply(jobs=infos)

    @guarded
    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        self.manager.cancel(request.job_id)
        return pb.CancelReply(job=job_info(self.manager, self.manager.record(request.job_id)))

    @guarded
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
        max_workers: int = 256,
    ) -> None:
        self.manager = JobManager(state_dir, listeners=lambda job_id: [metrics.JobMetrics(job_id)])
        interceptors = [TokenInterceptor(token)] if token else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.manager), self.server)
        pb_grpc.add_JobsServicer_to_server(JobsServicer(self.manager), self.server)
        creds = server_credentials(tls_cert, tls_key)
        host = listen.rsplit(":", 1)[0]
        self.port = self.server.add_secure_port(listen, creds) if creds else self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"--listen {listen}: could not bind")
        self.address = f"{host}:{self.port}"
        self.server.start()
        log.info(
            "coordinator listening on %s (%s, %s)",
            self.address,
            "TLS" if creds else "plaintext",
            "token required" if token else "no token",
        )

    def wait(self) -> None:
        self.server.wait_for_termination()

    def close(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
        self.manager.close()

    def __enter__(self) -> CoordinatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
