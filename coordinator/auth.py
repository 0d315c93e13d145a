"""Who may talk to the coordinator: a bearer token checked in constant time, and TLS credentials."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from coordinator import metrics


def read_token(path: Path | None) -> str | None:
    """The token in a file (surrounding whitespace ignored); None without a file."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ValueError(f"--token-file {path}: {err.strerror}") from None
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


def server_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def _abort_like(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that refuses the call."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        metrics.REJECTED.labels("unauthenticated").inc()
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry ``authorization: Bearer TOKEN``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        reason = "missing token" if not given else "wrong token"
        return _abort_like(handler, f"{reason}: pass --token-file or set PARLE_TOKEN")
