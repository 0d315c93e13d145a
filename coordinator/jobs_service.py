"""The ``Jobs`` service for clients: submit, get, list (paginated), cancel, watch and download."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from safetensors.torch import load_file

from coordinator.checkpoint import CheckpointStore
from coordinator.events import read_events
from coordinator.registry import JobRecord, registry_token
from coordinator.rpc_guard import guarded
from coordinator.rpc_limits import Limits, limited
from coordinator.service import JobManager
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import (
    encode_tensors,
)
from protos.messages import CoordinatorError
from protos.spec import parse_yaml, resolve
from protos.wire import (
    JOB_STATES,
    SPLITS,
    tensor_chunks,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_PAGE_BYTES = 100, 1000, 2 << 20
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
