"""The data channel's framing: a raw TCP (or TLS) connection that carries Exchange rounds as bulk bytes.

gRPC's Python stack copies every message several times and tops out well below what a socket moves
(bench/README.md, "Exchange throughput"); the data channel is a second listener of the coordinator that
moves the same round with ``sendall`` and ``recv_into`` straight between tensors' memory and the socket.
It is negotiated over gRPC (JoinHeader.data_port and data_ticket) and every control message is the
same protobuf the Exchange stream carries, so the rules and the validation are the same.

A frame is one byte of kind, a 4-byte little-endian body length, then the body (at most
``MAX_BODY_BYTES``). One connection serves one membership and one round at a time::

    worker                                   coordinator
    HELLO {token, job_id, worker_id, ticket}  ->
                                              <-  WELCOME                         (or ERROR, then close)
    UPLOAD pb.ExchangeUpload (one tensor)      ->
                                              <-  GO                              (or ERROR: header refused)
    the tensor's wire bytes (total_bytes)      ->
                                              <-  DOWNLOAD pb.ExchangeDownload, then its tensor's bytes
                                                  (or ERROR: e.g. NaN in the upload, stale round)
                                              <-  COMMIT                          (or ERROR: the job failed)
    UPLOAD ... (the next round)

The coordinator answers GO only after the header passed every check, so a refused header costs no
payload bytes; an upload refused for its content (NaN/Inf) has been read to its end, so the connection
stays in step and serves the next round. COMMIT says the closed round's state is on disk (the coordinator
sends the reference while writing it): the worker uses the reference only after COMMIT, so a coordinator
that crashes in between resumes at a round no worker has left.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

HELLO, WELCOME, UPLOAD, GO, DOWNLOAD, ERROR, COMMIT = 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    UPLOAD: "UPLOAD",
    GO: "GO",
    DOWNLOAD: "DOWNLOAD",
    ERROR: "ERROR",
    COMMIT: "COMMIT",
}
MAX_BODY_BYTES = 64 * 1024  # control messages only: headers, never tensor bytes
TICKET_BYTES = 32
# Capabilities.features entry of a worker that speaks this protocol (version 2: COMMIT; a worker or a
# coordinator that knows only version 1 does not offer or accept it, and the pair exchanges over gRPC).
FEATURE = "data-channel/2"
_HEAD = struct.Struct("<BI")


class FrameError(ConnectionError):
    """The peer broke the protocol or went away; the connection is unusable."""


def send_frame(sock: socket.socket, kind: int, body: bytes = b"") -> None:
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"a {KIND_NAMES[kind]} frame of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    sock.sendall(_HEAD.pack(kind, len(body)) + body)


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; ``FrameError`` if the peer closes first."""
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise FrameError(f"the peer closed the connection after {got} of {size} bytes")
        got += n


def recv_frame(sock: socket.socket, expect: tuple[int, ...]) -> tuple[int, bytes]:
    """The next frame, which must be one of ``expect`` (ERROR is always allowed)."""
    head = bytearray(_HEAD.size)
    recv_exactly(sock, memoryview(head))
    kind, size = _HEAD.unpack(head)
    if kind not in expect and kind != ERROR:
        wanted = " or ".join(KIND_NAMES[k] for k in expect)
        raise FrameError(f"expected a {wanted} frame, got kind {KIND_NAMES.get(kind, kind)}")
    if size > MAX_BODY_BYTES:
        raise FrameError(f"a {KIND_NAMES[kind]} frame announces {size} bytes, more than {MAX_BODY_BYTES}")
    body = bytearray(size)
    recv_exactly(sock, memoryview(body))
    return kind, bytes(body)


def send_json(sock: socket.socket, kind: int, value: dict[str, Any]) -> None:
    send_frame(sock, kind, json.dumps(value).encode())


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FrameError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def send_error(sock: socket.socket, code: str, message: str) -> None:
    send_json(sock, ERROR, {"code": code, "message": message[:4000]})


def parse_error(body: bytes) -> tuple[str, str]:
    value = parse_json(body, "an ERROR frame")
    return str(value.get("code", "UNKNOWN")), str(value.get("message", ""))
