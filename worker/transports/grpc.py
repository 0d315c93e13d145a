"""The gRPC worker transport: the worker loop's calls as RPCs to a ``parle coordinator``.

Exchange rounds go over the coordinator's data channel when its Join reply offers one (a raw TCP/TLS
socket: worker/transports/datachannel.py), else, or when it cannot be reached, as Exchange streams; every
other tensor travels chunked (<= 1 MiB) through the codec. A background thread renews the lease with
heartbeats while the worker computes. RPC failures become ``CoordinatorError`` with the status name as
code, so the worker loop can tell "rejoin" (UNAVAILABLE, NOT_FOUND, ...) from "give up".
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from protos import frames
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import encode_tensors
from protos.messages import CoordinatorError, EvalReport, ExchangeReply, JoinGrant, RoundStats
from protos.rpc import call, open_channel
from protos.spec import resolve
from protos.wire import SPLITS, directives_from_pb, receive_tensors, tensor_chunks, values_from_pb
from worker.transports.datachannel import DataChannel, DataChannelRefused, Unsent

log = logging.getLogger(__name__)


class GrpcTransport:
    def __init__(
        self,
        address: str,
        token: str | None = None,
        ca_cert: Path | None = None,
        job_id: str | None = None,
        timeout_s: float = 60.0,
        data_channel: bool = True,
        data_address: str | None = None,
    ) -> None:
        self.address = address
        self.token, self.ca_cert = token, ca_cert
        # Exchange over the coordinator's data channel when it offers one (worker/transports/datachannel.py);
        # False, or a channel that cannot be reached: Exchange streams.
        self.use_data_channel = data_channel
        self.data_address = data_address  # HOST:PORT where the data channel is reached, when not gRPC's host
        self.data: DataChannel | None = None
        self._data_warned = False
        self.data_exchanges = 0  # rounds the data channel carried, refused ones too (the rest: Exchange streams)
        self.channel = open_channel(address, ca_cert)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.wanted_job = job_id
        self.timeout_s = timeout_s
        self.worker_id = ""
        self.job_id = ""
        self._compression = pb.COMPRESSION_NONE
        self._round_timeout_s = timeout_s
        self._heartbeats: threading.Thread | None = None
        self._stop_heartbeats = threading.Event()

    # ----- membership ----------------------------------------------------------------------------

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant:
        # Asking to be taken back at a round (a restarted coordinator) means the job it was in, also for a
        # pool worker, which otherwise takes whatever job the coordinator assigns.
        job = self.wanted_job or (self.job_id if resume_round is not None else "")
        request = pb.JoinRequest(worker_name=name, device=device, job_id=job)
        if self.use_data_channel:
            request.capabilities.features.append(frames.FEATURE)
        if want_replica is not None:
            request.replica_index = want_replica
        if resume_round is not None:
            request.resume_round = resume_round
        stream = call(lambda: self.stub.Join(request, metadata=self.metadata, timeout=self.timeout_s))
        first = call(lambda: next(stream))
        head = first.header
        tensors = call(lambda: receive_tensors(head.tensors, stream, context="join"))
        spec = resolve(json.loads(head.spec_json))
        self.worker_id, self.job_id = head.worker_id, head.job_id
        self._compression = head.upload_compression or pb.COMPRESSION_NONE
        self._round_timeout_s = spec.optim.round_deadline_s + self.timeout_s
        self._start_heartbeats(max(head.lease_seconds / 3.0, 0.2))
        self._open_data_channel(head, device)
        return JoinGrant(
            worker_id=head.worker_id,
            job_id=head.job_id,
            replica=head.replica_index,
            spec=spec,
            values=values_from_pb(head.round_values),
            start=tensors.get("reference") if head.start == pb.START_KIND_REFERENCE else None,
            replica_state=tensors if head.start == pb.START_KIND_REPLICA_STATE else None,
            lease_s=head.lease_seconds,
            seed_center=head.seed_center,
            resume=head.start == pb.START_KIND_OWN_STATE,
            resume_duties=directives_from_pb(head.resume_duties),
        )

    def _open_data_channel(self, head: pb.JoinHeader, device: str) -> None:
        self._close_data_channel()
        if not (self.use_data_channel and head.data_port):
            return
        host, port = self.address.rsplit(":", 1)[0], head.data_port
        if self.data_address is not None:  # e.g. through a proxy or a NAT that maps the port
            host, _, given = self.data_address.rpartition(":")
            port = int(given)
        try:
            self.data = DataChannel.connect(
                host.strip("[]"),
                port,
                job_id=head.job_id,
                worker_id=head.worker_id,
                ticket=head.data_ticket,
                token=self.token,
                ca_cert=self.ca_cert,
                device=device,
            )
        except DataChannelRefused as err:
            self._data_fallback(str(err))

    def _data_fallback(self, why: str) -> None:
        """Exchange over gRPC from now on (until the next join); say so once per transport."""
        self._close_data_channel()
        if not self._data_warned:
            self._data_warned = True
            log.warning("data channel unusable (%s): exchanging over gRPC streams", why)

    def _close_data_channel(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def _start_heartbeats(self, every_s: float) -> None:
        self._stop_heartbeats.set()
        if self._heartbeats is not None:
            self._heartbeats.join(timeout=5)
        self._stop_heartbeats = threading.Event()
        stop = self._stop_heartbeats

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.heartbeat()
                except CoordinatorError as err:  # the round's own RPCs report real trouble
                    log.debug("heartbeat failed: %s", err)
                except ValueError:  # the channel was closed under us: nothing left to renew
                    return

        self._heartbeats = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeats.start()

    def heartbeat(self) -> bool:
        request = pb.HeartbeatRequest(worker_id=self.worker_id, job_id=self.job_id)
        reply = call(lambda: self.stub.Heartbeat(request, metadata=self.metadata, timeout=self.timeout_s))
        return not reply.stop

    def leave(self) -> None:
        self._stop_heartbeats.set()
        self._close_data_channel()
        if self.worker_id:
            request = pb.LeaveRequest(worker_id=self.worker_id, job_id=self.job_id)
            self.worker_id = ""
            call(lambda: self.stub.Leave(request, metadata=self.metadata, timeout=self.timeout_s))

    def fail(self, reason: str) -> None:
        request = pb.LeaveRequest(worker_id=self.worker_id, job_id=self.job_id, failed=True, reason=reason)
        call(lambda: self.stub.Leave(request, metadata=self.metadata, timeout=self.timeout_s))

    # ----- rounds --------------------------------------------------------------------------------

    def exchange(self, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply:
        if self.data is not None:
            upload = self._upload_header(round, stats, [])
            try:
                down, reference = self.data.exchange(upload, mu, self._compression, self._round_timeout_s)
            except CoordinatorError:  # the coordinator refused the round (the channel stays usable)
                self.data_exchanges += 1
                raise
            except Unsent as err:  # nothing reached the coordinator: this round goes over gRPC
                self._data_fallback(f"connection lost before the upload: {err}")
            except (OSError, frames.FrameError) as err:
                self._data_fallback(f"connection lost during round {round}: {err}")
                raise CoordinatorError("UNAVAILABLE", f"data channel lost during round {round}: {err}") from None
            else:
                self.data_exchanges += 1
                return ExchangeReply(
                    down.closed_round, reference, values_from_pb(down.next), directives_from_pb(down.directives)
                )
        encoded = encode_tensors([("mu", mu)], self._compression)
        upload = self._upload_header(round, stats, encoded.headers)

        def requests() -> Iterator[pb.ExchangeChunk]:
            yield pb.ExchangeChunk(upload=upload)
            yield from tensor_chunks(encoded.chunks, pb.ExchangeChunk)

        def run() -> ExchangeReply:
            responses = self.stub.Exchange(requests(), metadata=self.metadata, timeout=self._round_timeout_s)
            down = next(responses).download
            tensors = receive_tensors(down.tensors, responses, context=f"reference for round {round}")
            return ExchangeReply(
                down.closed_round, tensors["reference"], values_from_pb(down.next), directives_from_pb(down.directives)
            )

        return call(run)

    def _upload_header(self, round: int, stats: RoundStats, headers: list[pb.TensorHeader]) -> pb.ExchangeUpload:
        return pb.ExchangeUpload(
            worker_id=self.worker_id,
            job_id=self.job_id,
            round=round,
            train_loss=stats.train_loss,
            inner_steps=stats.inner_steps,
            samples=stats.samples,
            chain_seconds=stats.chain_seconds,
            tensors=headers,
            train_size=stats.train_size,
        )

    def _report(self, header: pb.ReportHeader, named: list[tuple[str, Tensor]]) -> None:
        encoded = encode_tensors(named)
        header.worker_id, header.job_id = self.worker_id, self.job_id
        header.tensors.extend(encoded.headers)

        def requests() -> Iterator[pb.ReportChunk]:
            yield pb.ReportChunk(header=header)
            yield from tensor_chunks(encoded.chunks, pb.ReportChunk)

        call(lambda: self.stub.Report(requests(), metadata=self.metadata, timeout=self.timeout_s))

    def report_eval(self, report: EvalReport) -> None:
        evals = [
            pb.EvalResult(round=report.round, split=SPLITS[split], loss=loss, error=error)
            for split, (loss, error) in report.results.items()
        ]
        kind = pb.STATE_KIND_MODEL if report.model_state is not None else pb.STATE_KIND_UNSPECIFIED
        header = pb.ReportHeader(
            round=report.round, evals=evals, stats=pb.WorkerStats(epoch=report.epoch), state_kind=kind
        )
        self._report(header, sorted((report.model_state or {}).items()))

    def report_state(self, round: int, state: dict[str, Tensor]) -> None:
        self._report(pb.ReportHeader(round=round, state_kind=pb.STATE_KIND_REPLICA), sorted(state.items()))

    def offer_state(self, round: int, state: dict[str, Tensor]) -> None:
        self._report(pb.ReportHeader(round=round, state_kind=pb.STATE_KIND_OFFER), sorted(state.items()))

    def fetch_model(self, round: int) -> Tensor:
        request = pb.FetchModelRequest(worker_id=self.worker_id, job_id=self.job_id, round=round)

        def run() -> Tensor:
            stream = self.stub.FetchModel(request, metadata=self.metadata, timeout=self._round_timeout_s)
            head = next(stream).header
            return receive_tensors(head.tensors, stream, context=f"model of round {round}")["model"]

        return call(run)

    def close(self) -> None:
        try:
            self.leave()
        except CoordinatorError as err:
            log.debug("leave on close failed: %s", err)
        self._close_data_channel()
        self.channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
