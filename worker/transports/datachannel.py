"""The worker's end of the data channel (framing: protos/frames.py; the coordinator's end:
coordinator/datachannel.py): one authenticated socket per membership that carries Exchange rounds.

The upload is sent with ``sendall`` from the tensor's own memory (a CPU float32 tensor is not copied;
a GPU tensor is copied once into a pinned host buffer with a non-blocking transfer, narrowed on the GPU
first when the job compresses), and the reference is received with ``recv_into`` into the tensor that is
returned (for a GPU worker: into a pinned buffer, then moved to the device without blocking). A CPU
worker's reference lands in memory an earlier reply used once nothing refers to that reply any more
(protos/buffers.py): no page faults, and no tensor the caller still holds ever changes.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protos import frames
from protos import parle_pb2 as pb
from protos.buffers import ReusableBuffers, narrowed_wire_view
from protos.codec import MAX_CHUNK_BYTES, CodecError, check_headers, to_proto_dtype
from protos.messages import CoordinatorError

_NARROWED = {pb.COMPRESSION_FP16: torch.float16, pb.COMPRESSION_BF16: torch.bfloat16}
CONNECT_S = 5.0  # connecting and the handshake; beyond it the worker keeps its gRPC stream


class DataChannelRefused(ConnectionError):
    """The coordinator's data channel cannot be used (unreachable, TLS failed, handshake refused)."""


class Unsent(ConnectionError):
    """The connection failed before the coordinator said GO: no byte of the upload reached it, so the
    round can be retried over gRPC."""


class DataChannel:
    def __init__(self, sock: socket.socket, device: torch.device) -> None:
        self.sock = sock
        self.device = device
        self._pinned_up: Tensor | None = None  # GPU workers: host staging buffers, allocated once
        self._pinned_down: Tensor | None = None
        self._down_done: torch.cuda.Event | None = None
        self._down = ReusableBuffers(keep=2)  # CPU workers: the loop holds the last reply until the next
        self._widened = ReusableBuffers(keep=2)  # the same, for a compressed reference widened to its dtype
        self._narrowed = ReusableBuffers(keep=2)  # a compressed upload's wire values

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        job_id: str,
        worker_id: str,
        ticket: bytes,
        token: str | None,
        ca_cert: Path | None,
        device: str = "cpu",
        timeout_s: float = CONNECT_S,
    ) -> DataChannel:
        """Connect, wrap in TLS when ``ca_cert`` is given (the coordinator's gRPC certificate, checked for
        ``host``), and say HELLO; ``DataChannelRefused`` if any of it fails."""
        try:
            where = torch.device(device)
        except RuntimeError as err:
            raise DataChannelRefused(f"device {device!r}: {err}") from None
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as err:
            raise DataChannelRefused(f"cannot connect to {host}:{port}: {err}") from None
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if ca_cert is not None:
                context = ssl.create_default_context(cafile=str(ca_cert))
                sock = context.wrap_socket(raw, server_hostname=host)
            hello = {"job_id": job_id, "worker_id": worker_id, "ticket": ticket.hex(), "token": token or ""}
            frames.send_json(sock, frames.HELLO, hello)
            kind, body = frames.recv_frame(sock, (frames.WELCOME,))
            if kind == frames.ERROR:
                code, message = frames.parse_error(body)
                raise DataChannelRefused(f"{code}: {message}")
        except (OSError, ssl.SSLError, frames.FrameError) as err:
            sock.close()
            if isinstance(err, DataChannelRefused):
                raise
            raise DataChannelRefused(f"handshake with {host}:{port} failed: {err}") from None
        return cls(sock, where)

    def exchange(
        self, upload: pb.ExchangeUpload, mu: Tensor, compression: pb.Compression, timeout_s: float
    ) -> tuple[pb.ExchangeDownload, Tensor]:
        """One round: ``upload`` (its tensors are filled in here) with ``mu``'s bytes, then the coordinator's
        ExchangeDownload and the reference, returned once COMMIT said the round is saved. Raises ``Unsent``
        when the connection failed before GO, ``CoordinatorError`` for the coordinator's refusals,
        ``ConnectionError`` after GO."""
        header, view = self._wire(mu, compression)
        del upload.tensors[:]
        upload.tensors.append(header)
        sock = self.sock
        try:
            sock.settimeout(timeout_s)
            frames.send_frame(sock, frames.UPLOAD, upload.SerializeToString())
            kind, body = frames.recv_frame(sock, (frames.GO,))
        except OSError as err:
            raise Unsent(str(err)) from None
        if kind == frames.ERROR:
            raise CoordinatorError(*frames.parse_error(body))
        sock.sendall(view.data)  # one call, from the tensor's memory
        kind, body = frames.recv_frame(sock, (frames.DOWNLOAD,))
        if kind == frames.ERROR:
            raise CoordinatorError(*frames.parse_error(body))
        down = pb.ExchangeDownload.FromString(body)
        reference = self._receive_reference(down.tensors)
        kind, body = frames.recv_frame(sock, (frames.COMMIT,))  # the round is saved: the reference may be used
        if kind == frames.ERROR:
            raise CoordinatorError(*frames.parse_error(body))
        return down, reference

    def _wire(self, mu: Tensor, compression: pb.Compression) -> tuple[pb.TensorHeader, np.ndarray]:
        if mu.device.type != "cuda":
            return narrowed_wire_view("mu", mu, compression, self._narrowed)
        narrow = _NARROWED.get(compression) if mu.dtype in (torch.float32, torch.float64) else None
        wire = mu.detach().reshape(-1)
        if narrow is not None:
            wire = wire.to(narrow)  # on the GPU: half the bytes cross to the host
        nbytes = wire.numel() * wire.element_size()
        if self._pinned_up is None or self._pinned_up.numel() < nbytes:
            self._pinned_up = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        staging = self._pinned_up[:nbytes].view(wire.dtype)
        staging.copy_(wire, non_blocking=True)
        torch.cuda.current_stream(mu.device).synchronize()  # the bytes must be on the host before sendall
        header = pb.TensorHeader(
            name="mu",
            dtype=to_proto_dtype(mu.dtype),
            shape=list(mu.shape),
            total_bytes=nbytes,
            num_chunks=-(-nbytes // MAX_CHUNK_BYTES),
            compression=compression if narrow is not None else pb.COMPRESSION_NONE,
        )
        return header, staging.view(torch.uint8).numpy()

    def _receive_reference(self, headers: Sequence[pb.TensorHeader]) -> Tensor:
        try:
            layout = check_headers(headers, context="reference")
        except CodecError as err:
            raise frames.FrameError(str(err)) from None
        if len(layout) != 1:
            raise frames.FrameError(f"expected one reference tensor, got {len(layout)}")
        dtype, wire_dtype, shape = layout[0].dtype, layout[0].wire_dtype, layout[0].shape
        nbytes = math.prod(shape) * wire_dtype.itemsize
        cuda = self.device.type == "cuda"
        if cuda:
            if self._down_done is not None:
                self._down_done.synchronize()  # the previous round's copy out of the buffer has finished
            if self._pinned_down is None or self._pinned_down.numel() < nbytes:
                self._pinned_down = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            raw = self._pinned_down[:nbytes]
        else:
            raw = self._down.take(nbytes, torch.uint8)  # memory the previous-but-one reply let go of, if any
        frames.recv_exactly(self.sock, raw.numpy().data)
        out = raw.view(wire_dtype).view(shape)
        if cuda:
            out = out.to(self.device, non_blocking=True)
            self._down_done = torch.cuda.Event()
            self._down_done.record()
        if out.dtype == dtype:
            return out
        return out.to(dtype) if cuda else self._widened.converted(out, dtype)  # compressed: widened

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
