"""The jobs client: what `parle submit / jobs / status / cancel / download` send to a coordinator."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.rpc import call, open_channel

if TYPE_CHECKING:
    from torch import Tensor


def state_name(state: int) -> str:
    """JOB_STATE_RUNNING -> running."""
    return str(pb.JobState.Name(state)).removeprefix("JOB_STATE_").lower()


ARTIFACTS = {"reference": pb.ARTIFACT_REFERENCE, "checkpoint": pb.ARTIFACT_CHECKPOINT, "model": pb.ARTIFACT_MODEL}


def parse_events(jsonl: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.splitlines() if line.strip()]


@dataclass(frozen=True)
class Endpoint:
    """Where the coordinator is and how to prove who we are; flags win over the environment."""

    address: str
    token: str | None = None
    ca_cert: Path | None = None

    @classmethod
    def resolve(cls, address: str | None, token_file: Path | None, ca_cert: Path | None) -> Endpoint:
        from coordinator.auth import read_token

        address = address or os.environ.get("PARLE_COORDINATOR")
        if not address:
            raise ValueError("--coordinator: no address given (or set PARLE_COORDINATOR=HOST:PORT)")
        token = read_token(token_file) or os.environ.get("PARLE_TOKEN") or None
        return cls(address, token, ca_cert)


def describe(info: pb.JobInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": info.id,
        "name": info.name,
        "state": state_name(info.state),
        "round": info.round,
        "total_rounds": info.total_rounds,
        "epoch": round(info.epoch, 3),
        "replicas": info.replicas,
        "live_workers": info.live_workers,
        "message": info.message,
    }
    if info.HasField("last_train_loss"):
        out["train_loss"] = info.last_train_loss
    if info.HasField("last_test_error"):
        out["test_error"] = info.last_test_error
    return out


class JobsClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = 30.0) -> None:
        self.channel = open_channel(endpoint.address, endpoint.ca_cert)
        self.stub = pb_grpc.JobsStub(self.channel)
        self.metadata = [("authorization", f"Bearer {endpoint.token}")] if endpoint.token else []
        self.timeout_s = timeout_s

    def submit(self, spec_yaml: str) -> str:
        request = pb.SubmitRequest(spec_yaml=spec_yaml)
        reply = call(lambda: self.stub.Submit(request, metadata=self.metadata, timeout=self.timeout_s))
        return str(reply.job_id)

    def get(self, job_id: str) -> pb.JobInfo:
        return call(lambda: self.stub.Get(pb.GetRequest(job_id=job_id), metadata=self.metadata, timeout=self.timeout_s))

    def jobs(self, page_size: int = 0) -> list[pb.JobInfo]:
        """Every job, newest first, following the server's pages."""
        out: list[pb.JobInfo] = []
        token = ""
        while True:
            reply = self._list_page(pb.ListRequest(page_size=page_size, page_token=token))
            out.extend(reply.jobs)
            token = reply.next_page_token
            if not token:
                return out

    def _list_page(self, request: pb.ListRequest) -> pb.ListReply:
        return call(lambda: self.stub.List(request, metadata=self.metadata, timeout=self.timeout_s))

    def cancel(self, job_id: str) -> pb.JobInfo:
        request = pb.CancelRequest(job_id=job_id)
        return call(lambda: self.stub.Cancel(request, metadata=self.metadata, timeout=self.timeout_s)).job

    def watch(self, job_id: str) -> Iterator[pb.JobEvent]:
        stream = call(lambda: self.stub.Watch(pb.WatchRequest(job_id=job_id), metadata=self.metadata))
        while True:
            event = call(lambda: next(stream, None))
            if event is None:
                return
            yield event

    def download(self, job_id: str, what: str = "reference") -> tuple[dict[str, Tensor], dict[str, Any]]:
        request = pb.DownloadRequest(job_id=job_id, what=ARTIFACTS[what])

        from protos.wire import receive_tensors  # torch: only downloads need it

        def run() -> tuple[dict[str, Tensor], dict[str, Any]]:
            stream = self.stub.Download(request, metadata=self.metadata, timeout=max(self.timeout_s, 600))
            head = next(stream).header
            tensors = receive_tensors(head.tensors, stream, context=f"download of {job_id}")
            return tensors, json.loads(head.manifest_json or "{}")

        return call(run)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's event log (what ``metrics.jsonl`` holds in its run directory)."""
        request = pb.DownloadRequest(job_id=job_id, what=pb.ARTIFACT_METRICS)

        def run() -> str:
            stream = self.stub.Download(request, metadata=self.metadata, timeout=self.timeout_s)
            return str(next(stream).header.events_jsonl)

        return parse_events(call(run))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
