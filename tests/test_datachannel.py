"""The data channel (coordinator/datachannel.py, worker/transports/datachannel.py): who may put bytes into
the accumulator, what the wire carries with TLS, refusals on the fast path, and the fallback to gRPC.
(The shared transport suite runs over it too: tests/test_transports.py, harness "grpc-data-channel".)"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_grpc_security import make_ca, make_server_cert
from transport_suite import STATS, in_threads, small_spec

from coordinator import metrics
from coordinator.job import Job
from coordinator.server import CoordinatorServer
from protos import frames
from protos import parle_pb2 as pb
from protos.messages import CoordinatorError
from worker.transports.grpc import GrpcTransport

TOKEN = "fast-s3cret"
SIZE = 1000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    with CoordinatorServer(tmp_path / "state", token=TOKEN) as s:
        yield s


@contextlib.contextmanager
def members(server: CoordinatorServer, n: int) -> Iterator[tuple[Job, list[GrpcTransport]]]:
    job = server.manager.job(server.manager.submit(small_spec(replicas=n)))
    transports = [GrpcTransport(server.address, TOKEN, job_id=job.job_id, timeout_s=30) for _ in range(n)]
    try:
        for i, t in enumerate(transports):
            t.join(f"w{i}", "cpu", i)
        yield job, transports
    finally:
        for t in transports:
            t.close()


def exchange_all(transports: list[GrpcTransport], k: int, values: list[float]) -> list[Any]:
    calls = [
        lambda t=t, v=v: t.exchange(k, torch.full((SIZE,), v), STATS) for t, v in zip(transports, values, strict=True)
    ]
    return in_threads(*calls)


# =====================================================================================================
# Who may send
# =====================================================================================================


def attack(port: int, hello: dict[str, str], worker_id: str, job_id: str) -> tuple[str, bool]:
    """Say HELLO and, without waiting for the answer, send an upload of huge values; returns the code of the
    ERROR that came back and whether the coordinator then closed the connection."""
    upload = pb.ExchangeUpload(worker_id=worker_id, job_id=job_id, round=0, train_size=STATS.train_size)
    upload.tensors.append(
        pb.TensorHeader(name="mu", dtype=pb.DTYPE_FLOAT32, shape=[SIZE], total_bytes=4 * SIZE, num_chunks=1)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        frames.send_json(sock, frames.HELLO, hello)
        with contextlib.suppress(OSError):  # the coordinator may already have closed the connection
            frames.send_frame(sock, frames.UPLOAD, upload.SerializeToString())
            sock.sendall(struct.pack("<f", 1e6) * SIZE)
        kind, body = frames.recv_frame(sock, (frames.WELCOME,))
        assert kind == frames.ERROR
        code, _ = frames.parse_error(body)
        return code, closed(sock)


def closed(sock: socket.socket) -> bool:
    """The peer closed the connection (a reset too: it did not read what was sent)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_without_the_token_or_ticket_move_no_bytes_into_the_sum(server: CoordinatorServer) -> None:
    assert server.data is not None
    with members(server, 2) as (job, (a, b)):
        assert a.data is not None and b.data is not None
        ticket = server.data.tickets.issue(job.job_id, a.worker_id).hex()
        other = server.data.tickets.issue(job.job_id, b.worker_id).hex()
        ids = {"job_id": job.job_id, "worker_id": a.worker_id}
        cases = {
            "no token": {**ids, "ticket": ticket},
            "wrong token": {**ids, "ticket": ticket, "token": "guess"},
            "no ticket": {**ids, "token": TOKEN},
            "wrong ticket": {**ids, "token": TOKEN, "ticket": "00" * frames.TICKET_BYTES},
            "another member's ticket": {**ids, "token": TOKEN, "ticket": other},
        }
        for why, hello in cases.items():
            assert attack(server.data.port, hello, a.worker_id, job.job_id) == ("UNAUTHENTICATED", True), why
        # The round is still empty: the members' own uploads alone make its mean, exactly.
        replies = exchange_all([a, b], 0, [1.0, 3.0])
        assert all(torch.equal(r.reference, torch.full((SIZE,), 2.0)) for r in replies)
        assert a.data_exchanges == b.data_exchanges == 1


def test_a_worker_without_the_token_is_refused_by_grpc_before_any_data_channel(server: CoordinatorServer) -> None:
    job = server.manager.job(server.manager.submit(small_spec(replicas=1)))
    with GrpcTransport(server.address, "wrong", job_id=job.job_id, timeout_s=30) as t:
        with pytest.raises(CoordinatorError) as info:
            t.join("intruder", "cpu")
        assert info.value.code == "UNAUTHENTICATED" and t.data is None


# =====================================================================================================
# What the wire carries
# =====================================================================================================


class Tap:
    """A TCP relay from a local port to ``target``, keeping every byte the client sent."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
                threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if record:
                    self.sent += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_with_tls_the_tensor_bytes_are_not_on_the_wire(tmp_path: Path, tls: bool) -> None:
    ca, cert, key = None, None, None
    if tls:
        ca_key, ca = make_ca(tmp_path, "ca")
        cert, key = make_server_cert(tmp_path, ca_key, ca, "DNS:localhost,IP:127.0.0.1")
    with CoordinatorServer(tmp_path / "state", tls_cert=cert, tls_key=key) as server:
        assert server.data is not None
        tap = Tap(server.data.port)
        job = server.manager.job(server.manager.submit(small_spec(replicas=1)))
        address = f"localhost:{server.port}" if tls else server.address
        with GrpcTransport(address, None, ca, job_id=job.job_id, data_address=f"127.0.0.1:{tap.port}") as t:
            t.join("w", "cpu")
            mu = torch.full((SIZE,), 1234.5)
            reply = t.exchange(0, mu, STATS)
            assert t.data_exchanges == 1 and torch.equal(reply.reference, mu)
        tap.close()
    pattern = struct.pack("<f", 1234.5) * 64
    assert len(tap.sent) > 4 * SIZE  # the upload did cross the tap
    assert (pattern in tap.sent) is not tls


# =====================================================================================================
# Refusals, and the fallback
# =====================================================================================================


def test_bad_uploads_are_refused_and_the_center_is_untouched(server: CoordinatorServer) -> None:
    with members(server, 2) as (job, (a, b)):
        exchange_all([a, b], 0, [0.0, 2.0])
        before = job.center.clone() if job.center is not None else None
        late_nan = torch.ones(SIZE)
        late_nan[-1] = float("nan")  # after every other value has arrived and been checked
        cases = [
            (lambda: a.exchange(1, late_nan, STATS), "INVALID_ARGUMENT", "NaN or Inf at flat index 999"),
            (lambda: a.exchange(1, torch.full((SIZE,), float("inf")), STATS), "INVALID_ARGUMENT", "NaN or Inf"),
            (lambda: a.exchange(1, torch.ones(SIZE + 1), STATS), "INVALID_ARGUMENT", "expected float32 shape"),
            (lambda: a.exchange(1, torch.ones(SIZE, dtype=torch.float64), STATS), "INVALID_ARGUMENT", "expected"),
            (lambda: a.exchange(0, torch.ones(SIZE), STATS), "FAILED_PRECONDITION", "stale round"),
        ]
        for call, code, text in cases:
            with pytest.raises(CoordinatorError) as info:
                call()
            assert info.value.code == code and text in str(info.value), str(info.value)
        assert before is not None and job.center is not None and torch.equal(job.center, before)
        assert a.data is not None  # the connection stayed in step: the next round uses it
        replies = exchange_all([a, b], 1, [4.0, 6.0])
        assert torch.equal(replies[0].reference, torch.full((SIZE,), 5.0))
        assert a.data_exchanges == 2 + len(cases)


def test_an_upload_that_is_not_float_is_refused_before_the_job_knows_its_center(server: CoordinatorServer) -> None:
    with members(server, 2) as (job, (a, b)):
        assert job.center is None  # nothing to check the dtype against yet: Job.report refuses it
        with pytest.raises(CoordinatorError) as info:
            a.exchange(0, torch.ones(SIZE, dtype=torch.int32), STATS)
        assert info.value.code == "INVALID_ARGUMENT" and "must be a flat float tensor" in str(info.value)
        assert a.data is not None and a.data_exchanges == 1  # the connection stayed in step
        replies = exchange_all([a, b], 0, [1.0, 3.0])
        assert torch.equal(replies[0].reference, torch.full((SIZE,), 2.0))


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_references_a_caller_keeps_never_change_and_memory_it_let_go_of_is_reused(
    server: CoordinatorServer, compression: str
) -> None:
    spec = small_spec(replicas=1, runtime={"compression": compression})
    job = server.manager.job(server.manager.submit(spec))
    with GrpcTransport(server.address, TOKEN, job_id=job.job_id, timeout_s=30) as a:
        a.join("w", "cpu")
        kept = [a.exchange(k, torch.full((SIZE,), float(k)), STATS).reference for k in range(4)]
        assert [float(r[0]) for r in kept] == [0.0, 1.0, 2.0, 3.0]  # each one its own memory while held
        assert all(bool((r == k).all()) for k, r in enumerate(kept))
        ptrs = set()
        for k in range(4, 10):  # as the worker's loop does: the last reply is dropped when the next arrives
            reference = a.exchange(k, torch.full((SIZE,), float(k)), STATS).reference
            assert bool((reference == k).all())
            ptrs.add(reference.data_ptr())
        assert len(ptrs) == 2  # two buffers take turns
        assert job.center is not None and job.center.dtype == torch.float32 and bool((job.center == 9.0).all())
        assert a.data_exchanges == 10


def test_an_upload_kept_as_the_center_is_never_overwritten_by_a_later_upload(server: CoordinatorServer) -> None:
    """With one replica the upload's receive buffer becomes the round's mean (donated, not copied): the
    pool must not read the next upload into it while the center, a reply or the round state holds it."""
    job = server.manager.job(server.manager.submit(small_spec(replicas=1)))
    with GrpcTransport(server.address, TOKEN, job_id=job.job_id, timeout_s=30) as a:
        a.join("w", "cpu")
        centers = []
        for k in range(8):
            a.exchange(k, torch.full((SIZE,), float(k)), STATS)
            assert job.center is not None
            if k % 2 == 0:
                centers.append((k, job.center))  # held, like a checkpoint or a slow reply would
        assert a.data_exchanges == 8
    assert [float(center[0]) for _, center in centers] == [0.0, 2.0, 4.0, 6.0]
    assert all(bool((center == k).all()) for k, center in centers)
    assert len({center.data_ptr() for _, center in centers}) == 4


def test_workers_waiting_for_the_round_hold_no_receive_buffer(server: CoordinatorServer) -> None:
    """Three of four members upload, one after the other, and wait for the fourth: the first upload is kept
    (the round's sum starts from it), the others' buffers are free again once added, so the pool holds two
    buffers, not one per waiting worker."""
    assert server.data is not None
    uploaded = metrics.EXCHANGE_BYTES.labels("up")
    with members(server, 4) as (_, transports):
        waiting = []
        for i, t in enumerate(transports[:3]):
            before = uploaded._value.get()
            waiting.append(threading.Thread(target=t.exchange, args=(0, torch.full((SIZE,), float(i)), STATS)))
            waiting[-1].start()
            deadline = time.monotonic() + 30
            while uploaded._value.get() < before + 4 * SIZE and time.monotonic() < deadline:
                time.sleep(0.005)
        assert all(w.is_alive() for w in waiting) and len(server.data._pool) == 2
        reply = transports[3].exchange(0, torch.full((SIZE,), 6.0), STATS)
        for w in waiting:
            w.join(30)
        assert torch.equal(reply.reference, torch.full((SIZE,), 2.25))


def hold_round_state_saves(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Round-state writes (on the job's writer) wait for ``release``; ``saving`` is set when one starts."""
    from coordinator import job_files, round_state

    saving, release = threading.Event(), threading.Event()
    real_save = round_state.save_round_state

    def slow_save(path: Path, state: round_state.RoundState) -> None:
        saving.set()
        assert release.wait(30), "the test never released the write"
        real_save(path, state)

    monkeypatch.setattr(job_files, "save_round_state", slow_save)
    return saving, release


def test_the_reference_is_sent_while_the_round_is_saved_and_used_only_after_commit(
    server: CoordinatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator import metrics

    saving, release = hold_round_state_saves(monkeypatch)
    down = metrics.EXCHANGE_BYTES.labels("down")
    with members(server, 1) as (_job, (a,)):
        before = down._value.get()
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(a.exchange(0, torch.full((SIZE,), 3.0), STATS)))
        thread.start()
        assert saving.wait(30)
        deadline = threading.Event()
        for _ in range(300):  # the reference's bytes leave while the round state is still being written
            if down._value.get() >= before + SIZE * 4:
                break
            deadline.wait(0.1)
        assert down._value.get() >= before + SIZE * 4
        thread.join(0.5)
        assert thread.is_alive() and not result  # not usable before COMMIT
        release.set()
        thread.join(30)
        assert result and torch.equal(result[0].reference, torch.full((SIZE,), 3.0))
        assert a.data_exchanges == 1


def test_a_job_that_ends_while_its_round_is_saved_answers_error_instead_of_commit(
    server: CoordinatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    saving, release = hold_round_state_saves(monkeypatch)
    try:
        with members(server, 1) as (job, (a,)):
            errors: list[BaseException] = []

            def exchange() -> None:
                try:
                    a.exchange(0, torch.full((SIZE,), 3.0), STATS)
                except BaseException as err:
                    errors.append(err)

            thread = threading.Thread(target=exchange)
            thread.start()
            assert saving.wait(30)
            server.manager.cancel(job.job_id)
            thread.join(30)
            assert not thread.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], CoordinatorError), errors
            assert "cancelled" in str(errors[0])
    finally:
        release.set()


def test_fp16_on_the_wire(server: CoordinatorServer, tmp_path: Path) -> None:
    job = server.manager.job(server.manager.submit(small_spec(replicas=1, runtime={"compression": "fp16"})))
    with GrpcTransport(server.address, TOKEN, job_id=job.job_id, timeout_s=30) as t:
        t.join("w", "cpu")
        mu = torch.linspace(-2, 2, SIZE)
        reply = t.exchange(0, mu, STATS)
        assert t.data_exchanges == 1 and reply.reference.dtype == torch.float32
        assert torch.equal(reply.reference, mu.half().float())


def test_unreachable_data_channel_falls_back_to_grpc(server: CoordinatorServer, caplog: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    job = server.manager.job(server.manager.submit(small_spec(replicas=1)))
    with (
        caplog.at_level(logging.WARNING, logger="worker.transports.grpc"),
        GrpcTransport(
            server.address, TOKEN, job_id=job.job_id, timeout_s=30, data_address=f"127.0.0.1:{closed_port}"
        ) as t,
    ):
        t.join("w", "cpu")
        for k in range(2):
            reply = t.exchange(k, torch.full((SIZE,), float(k)), STATS)
            assert torch.equal(reply.reference, torch.full((SIZE,), float(k)))
        assert t.data is None and t.data_exchanges == 0
    warnings = [r for r in caplog.records if "exchanging over gRPC" in r.getMessage()]
    assert len(warnings) == 1


def test_coordinator_flag_turns_the_data_channel_off(tmp_path: Path) -> None:
    with CoordinatorServer(tmp_path / "state", data_channel=False) as server:
        assert server.data is None
        job = server.manager.job(server.manager.submit(small_spec(replicas=1)))
        with GrpcTransport(server.address, job_id=job.job_id, timeout_s=30) as t:
            t.join("w", "cpu")
            reply = t.exchange(0, torch.ones(SIZE), STATS)
            assert t.data is None and t.data_exchanges == 0 and torch.equal(reply.reference, torch.ones(SIZE))


def test_handshake_garbage_is_refused(server: CoordinatorServer) -> None:
    assert server.data is not None
    with socket.create_connection(("127.0.0.1", server.data.port), timeout=10) as sock:
        sock.sendall(bytes([frames.HELLO]) + struct.pack("<I", 10**9))  # a body far beyond the limit
        assert closed(sock)  # without reading the body
    with socket.create_connection(("127.0.0.1", server.data.port), timeout=10) as sock:
        frames.send_frame(sock, frames.HELLO, b"not json")
        assert closed(sock)
    with socket.create_connection(("127.0.0.1", server.data.port), timeout=10) as sock:
        frames.send_frame(sock, frames.HELLO, json.dumps([1, 2]).encode())
        assert closed(sock)
