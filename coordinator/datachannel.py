"""The coordinator's data channel: Exchange rounds over a raw TCP (or TLS) socket (framing: protos/frames.py).

Who may send: a connection is served only after its HELLO carries the worker token (when the coordinator
requires one, compared in constant time) and the membership's ticket, an HMAC of (job, worker) under a
secret made at start-up and handed out only in an authenticated Join reply. Nothing a connection sends
before that is read beyond one bounded HELLO frame, and a connection that has not said HELLO within
``HANDSHAKE_S`` is closed. With TLS the socket is wrapped with the gRPC server's certificate.

What reaches the center: an upload's header is validated with the codec's rules (dtype, shape against
the center, size against the in-flight budget) before the coordinator answers GO; its bytes are then read
with ``recv_into`` straight into a pooled buffer, and each block is checked for NaN/Inf while it is in cache
(on the values' bits: coordinator/sum_kernels.py). Only a complete, finite upload goes to ``Job.report``,
which adds it to the float64 sum in one pass: a rejected upload, however late its bad value, never touches
the center.

When rounds are saved (the service), the reply's bytes are sent while the round state is being written,
and a COMMIT frame follows once it is on disk; the worker acts on the reference only after COMMIT.

Memory: at most ``uploads_at_once`` uploads are read at once, into reused buffers (each as large as the
largest upload; a round's first upload becomes its sum's start, or its mean when it stays the only one, and
its buffer is reused once the round lets go of it); a worker waiting for its slot, or for the round to
close, holds a socket and a thread, not a tensor. The reply is sent from the round's reference itself,
with no copy (narrowed first when the job compresses).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import torch
from google.protobuf.message import DecodeError

from coordinator import metrics
from coordinator.job import Job
from coordinator.reference import count_nonfinite
from coordinator.service import JobManager
from protos import frames
from protos import parle_pb2 as pb
from protos.buffers import ReusableBuffers, narrowed_wire_view
from protos.codec import CodecError, CodecTooLarge, TensorSpec, WireLayout, check_headers
from protos.messages import CoordinatorError, ExchangeReply, RoundStats
from protos.wire import COMPRESSION, directives_to_pb, values_to_pb

if TYPE_CHECKING:  # server.py builds the data channel, so it cannot be imported here at run time
    from coordinator.rpc_limits import Limits

log = logging.getLogger(__name__)

HANDSHAKE_S = 10.0  # a connection must complete TLS and HELLO within this
UPLOADS_AT_ONCE = 4  # receive buffers: uploads read at the same time (the rest wait, holding nothing)
POLL_S = 0.5
RECV_BYTES = 8 << 20  # most bytes one recv_into asks for: few calls, and checks that keep up with arrival
CHECK_BLOCK_BYTES = 1 << 20  # the finite check runs on each MiB as it arrives, while it is in cache


class Tickets:
    """Per-membership secrets for the data channel's handshake: HMAC-SHA256 of (job id, worker id) under a
    key made at start-up, so nothing is stored per worker and a restarted coordinator's tickets differ."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def issue(self, job_id: str, worker_id: str) -> bytes:
        return hmac.new(self._key, f"{job_id}\0{worker_id}".encode(), hashlib.sha256).digest()

    def valid(self, job_id: str, worker_id: str, ticket: bytes) -> bool:
        return hmac.compare_digest(self.issue(job_id, worker_id), ticket)


class BufferPool:
    """At most ``slots`` uploads are read at once (``take`` waits, at most ``wait_s``, for a turn), each into
    a buffer nothing else refers to (protos/buffers.py; it grows to the largest upload and is reused). The
    job may keep an upload's buffer (a round's first report, donated: coordinator/reference.py); it is then
    out of use until the round lets go of it, and another buffer serves meanwhile. At most ``2 * slots``
    buffers are kept for reuse."""

    def __init__(self, slots: int) -> None:
        self._turns = threading.BoundedSemaphore(slots)
        self._buffers = ReusableBuffers(keep=2 * slots, keep_idle=True)

    @contextlib.contextmanager
    def take(self, nbytes: int, wait_s: float, what: str) -> Iterator[torch.Tensor]:
        if not self._turns.acquire(timeout=wait_s):
            raise CoordinatorError("RESOURCE_EXHAUSTED", f"{what}: every receive buffer is busy; retry later")
        try:
            yield self._buffers.take(nbytes, torch.uint8)
        finally:
            self._turns.release()

    def __len__(self) -> int:
        """Buffers kept for reuse, free or in use."""
        return len(self._buffers)


class _Always:
    """What ``ByteBudget.hold`` asks of a gRPC context: the socket's peer is checked by its reads instead."""

    def is_active(self) -> bool:
        return True


def server_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class DataChannelServer:
    """Listens on ``host:port`` (0: any free port) and serves each authenticated connection in a thread.

    ``limits``: the gRPC server's ``Limits`` (stop flag, in-flight byte budget shared with Exchange and
    Report streams, upload idle time); ``worker_token``: the token HELLO must carry (None: none is required)."""

    def __init__(
        self,
        manager: JobManager,
        limits: Limits,
        host: str,
        port: int = 0,
        *,
        worker_token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 512,
        uploads_at_once: int = UPLOADS_AT_ONCE,
    ) -> None:
        self.manager = manager
        self.limits = limits
        self.tickets = Tickets()
        self._token = None if worker_token is None else worker_token.encode()
        self._ssl = ssl_context
        self._pool = BufferPool(uploads_at_once)
        self._widened = ReusableBuffers(keep=uploads_at_once)  # compressed uploads, widened (one per pool buffer)
        self._narrowed = ReusableBuffers(keep=uploads_at_once)  # compressed references being sent
        self._slots = threading.BoundedSemaphore(max_connections)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="data-accept", daemon=True)
        self._thread.start()

    # ----- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                metrics.REJECTED.labels("resource_exhausted").inc()
                conn.close()  # the worker falls back to its gRPC stream
                continue
            threading.Thread(target=self._serve, args=(conn,), name="data-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sock = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished worker frees its thread
            conn.settimeout(HANDSHAKE_S)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(conn, server_side=True)
            with self._lock:
                if self._closed:
                    return
                self._conns.add(sock)
            member = self._handshake(sock)
            if member is not None:
                self._rounds(sock, *member)
        except (OSError, frames.FrameError, ssl.SSLError) as err:
            log.debug("data channel connection ended: %s", err)
        except Exception:  # a bug: end this connection (the worker falls back to gRPC), keep serving
            log.exception("data channel connection failed")
        finally:
            with self._lock:
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()
            self._slots.release()

    def _handshake(self, sock: socket.socket) -> tuple[str, str] | None:
        """(job id, worker id) of an authenticated member, or None after answering ERROR."""
        _, body = frames.recv_frame(sock, (frames.HELLO,))
        hello = frames.parse_json(body, "HELLO")
        job_id, worker_id = str(hello.get("job_id", "")), str(hello.get("worker_id", ""))
        try:
            ticket = bytes.fromhex(str(hello.get("ticket", "")))
        except ValueError:
            ticket = b""
        given = f"Bearer {hello.get('token', '')}".encode()
        token_ok = self._token is None or hmac.compare_digest(given, b"Bearer " + self._token)
        ticket_ok = self.tickets.valid(job_id, worker_id, ticket)
        if not (token_ok and ticket_ok):
            metrics.REJECTED.labels("unauthenticated").inc()
            reason = "wrong or missing token" if not token_ok else "wrong ticket for this membership"
            log.info("data channel: refused a connection (%s)", reason)
            frames.send_error(sock, "UNAUTHENTICATED", f"data channel: {reason}")
            return None
        try:
            self._member_job(job_id, worker_id)
        except CoordinatorError as err:
            frames.send_error(sock, err.code, str(err))
            return None
        frames.send_frame(sock, frames.WELCOME)
        return job_id, worker_id

    def _member_job(self, job_id: str, worker_id: str) -> Job:
        job = self.manager.job(job_id)
        job.check_member(worker_id)
        return job

    # ----- rounds --------------------------------------------------------------------------------

    def _rounds(self, sock: socket.socket, job_id: str, worker_id: str) -> None:
        while not self.limits.stopping.is_set():
            sock.settimeout(None)  # between rounds a worker computes as long as it needs
            _, body = frames.recv_frame(sock, (frames.UPLOAD,))
            try:
                job, round, reply = self._upload(sock, job_id, worker_id, body)
                self._download(sock, job, reply)
                self._commit(sock, job, round)
            except (CoordinatorError, CodecError, ValueError, DecodeError) as err:
                code = _status(err)
                metrics.REJECTED.labels(code.lower()).inc()
                log.info("data channel: rejected (%s): %s", code, err)
                frames.send_error(sock, code, str(err))

    def _upload(self, sock: socket.socket, job_id: str, worker_id: str, body: bytes) -> tuple[Job, int, ExchangeReply]:
        self.limits.check_open()
        up = pb.ExchangeUpload.FromString(body)
        if (up.job_id, up.worker_id) != (job_id, worker_id):
            raise CoordinatorError(
                "PERMISSION_DENIED", f"this connection belongs to worker {worker_id} of job {job_id}"
            )
        job = self._member_job(job_id, worker_id)
        if len(up.tensors) != 1:
            raise CoordinatorError(
                "INVALID_ARGUMENT", f"expected one tensor (the coupled average), got {len(up.tensors)}"
            )
        center = job.center
        expected = None if center is None else {up.tensors[0].name: TensorSpec.of(center)}
        what = f"coupled average from {worker_id}, round {up.round}"
        limit = self.limits.budget.limit
        layout = check_headers(up.tensors, expected=expected, max_total_bytes=limit, context=what)[0]
        reply = self._receive_and_report(sock, job, up, layout, what)
        if reply is None:  # sync: wait for the others, holding no buffer
            reply = self._await_round(job, worker_id, up.round)
        return job, up.round, reply

    def _receive_and_report(
        self, sock: socket.socket, job: Job, up: pb.ExchangeUpload, layout: WireLayout, what: str
    ) -> ExchangeReply | None:
        """GO, the upload's bytes into a pool buffer, then ``Job.report``. A function of its own so that its
        references to the buffer end when it returns: a worker waiting for the round holds none (the pool
        would otherwise find the buffer in use and read the next upload into a new one)."""
        stats = RoundStats(up.train_loss, up.inner_steps, up.samples, up.chain_seconds, up.train_size)
        nbytes = up.tensors[0].total_bytes
        budget, idle_s = self.limits.budget, self.limits.uploads.idle_s
        with (
            budget.hold(nbytes, what, idle_s, cast(grpc.ServicerContext, _Always())),
            self._pool.take(nbytes, idle_s, what) as raw,
        ):
            frames.send_frame(sock, frames.GO)
            sock.settimeout(idle_s)  # a stalled upload is dropped, and its buffer and budget with it
            bad = self._receive(sock, raw, layout.wire_dtype)
            metrics.EXCHANGE_BYTES.labels("up").inc(nbytes)
            if bad is not None:
                raise CoordinatorError("INVALID_ARGUMENT", f"{what}: {bad}")
            mu = raw.view(layout.wire_dtype)
            if layout.wire_dtype != layout.dtype:  # compressed on the wire: widened like the codec does,
                mu = self._widened.converted(mu, layout.dtype)  # into memory no round refers to any more
            # donated: neither the pool nor the widening ring hands out a buffer a round still refers to
            return job.report(up.worker_id, up.round, mu.view(layout.shape), stats, finite=True, donated=True)

    @staticmethod
    def _receive(sock: socket.socket, raw: torch.Tensor, wire_dtype: torch.dtype) -> str | None:
        """Read the upload into ``raw``; returns what is wrong when a value is NaN or Inf. Each block is checked
        as soon as it has arrived (while in cache, and overlapping the sender). A bad upload is still read to
        its end, so the connection stays in step."""
        view = raw.numpy().data
        values = raw.view(wire_dtype)
        size, item = len(view), wire_dtype.itemsize
        block = CHECK_BLOCK_BYTES // item * item
        bad: str | None = None
        got = checked = 0
        while got < size:
            n = sock.recv_into(view[got:], min(size - got, RECV_BYTES))
            if n == 0:
                raise frames.FrameError(f"the worker closed the connection after {got} of {size} bytes")
            got += n
            ready = got if got == size else got // block * block
            if bad is not None or ready <= checked or not wire_dtype.is_floating_point:
                continue  # (a tensor that is not float is read, unchecked, and refused by Job.report)
            span = values[checked // item : ready // item]
            if count_nonfinite(span) > 0:
                nonfinite = ~torch.isfinite(span)
                first = checked // item + int(nonfinite.nonzero()[0, 0])
                bad = f"NaN or Inf at flat index {first} ({int(nonfinite.sum())} in its block of {span.numel()})"
            checked = ready
        return bad

    def _await_round(self, job: Job, worker_id: str, round: int) -> ExchangeReply:
        """The closed round's reply, without waiting for its round state to reach the disk (``_commit`` does)."""
        while True:
            self.limits.check_open()
            try:
                return job.await_round(worker_id, round, POLL_S, durable=False)
            except CoordinatorError as err:
                if err.code != "DEADLINE_EXCEEDED":
                    raise

    def _commit(self, sock: socket.socket, job: Job, round: int) -> None:
        """COMMIT once the round state naming the next round is on disk (the write overlapped the download):
        only then does the worker use the reference, so no worker is ever ahead of what a restarted
        coordinator reads back. A job that failed meanwhile answers ERROR instead."""
        while True:
            self.limits.check_open()
            try:
                job.await_durable(round, POLL_S)
                break
            except CoordinatorError as err:
                if err.code != "DEADLINE_EXCEEDED":
                    raise
        frames.send_frame(sock, frames.COMMIT)

    def _download(self, sock: socket.socket, job: Job, reply: ExchangeReply) -> None:
        compression = COMPRESSION[job.spec.runtime.compression]
        header, view = narrowed_wire_view("reference", reply.reference, compression, self._narrowed)
        down = pb.ExchangeDownload(
            closed_round=reply.closed_round,
            next=values_to_pb(reply.next_values),
            directives=directives_to_pb(reply.directives),
            tensors=[header],
        )
        frames.send_frame(sock, frames.DOWNLOAD, down.SerializeToString())
        sock.settimeout(self.limits.uploads.idle_s)
        sock.sendall(view.data)  # one call: the kernel paces it, and the GIL is given up once
        metrics.EXCHANGE_BYTES.labels("down").inc(header.total_bytes)

    def close(self) -> None:
        """Stop accepting and end every connection (their threads see the socket close)."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self._listener.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


def _status(err: Exception) -> str:
    if isinstance(err, CoordinatorError):
        return err.code
    if isinstance(err, CodecTooLarge):
        return "RESOURCE_EXHAUSTED"
    return "INVALID_ARGUMENT"
