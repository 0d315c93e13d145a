"""Every resource a client can make the coordinator hold is bounded here: streams per method, bytes of
uploads in flight (one budget for Exchange and Report), idle uploads, chunk sizes, and how long a handler
waits (it gives up when its client goes away). A call past a limit is answered RESOURCE_EXHAUSTED with a
message that names the limit."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from coordinator import metrics
from protos import parle_pb2 as pb
from protos.codec import (
    MAX_CHUNK_BYTES,
    CodecError,
    CodecTooLarge,
    TensorAssembler,
)
from protos.messages import CoordinatorError
from protos.spec import MAX_REPLICAS

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
