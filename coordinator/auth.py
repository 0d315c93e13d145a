"""Who may talk to the coordinator: a bearer token checked in constant time, and TLS credentials."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from coordinator import metrics


def read_token(path: Path | None, flag: str = "--token-file") -> str | None:
    """The token in a file (surrounding whitespace ignored); None without a file."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror}") from None
    if not token:
        raise ValueError(f"{flag} {path}: the file is empty")
    return token


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` binds only this machine (127.0.0.0/8, ::1, localhost)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def _abort_like(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that refuses the call."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        metrics.REJECTED.labels(code.name.lower()).inc()
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


# Which role each service serves: workers call Coordinator, submitters (clients) call Jobs.
ROLES = {"parle.v1.Coordinator": "worker", "parle.v1.Jobs": "client"}
ROLE_FLAGS = {"worker": "--worker-token-file", "client": "--client-token-file"}


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry ``authorization: Bearer TOKEN`` with the token of its service's role: the worker
    token for ``Coordinator``, the client token for ``Jobs`` (one token may serve both). A token of the
    other role is PERMISSION_DENIED; a missing or unknown one UNAUTHENTICATED."""

    def __init__(self, token: str | None = None, *, worker: str | None = None, client: str | None = None) -> None:
        worker, client = worker or token, client or token
        if not worker or not client:
            raise ValueError("tokens: give --token-file (both roles), or --worker-token-file and --client-token-file")
        self._expected = {"worker": f"Bearer {worker}".encode(), "client": f"Bearer {client}".encode()}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        role = ROLES.get(service)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        # Compare with every role's token (constant time each) so the outcome does not depend on timing.
        matches = {r for r, expected in self._expected.items() if hmac.compare_digest(given_bytes, expected)}
        if role is None:  # a service without a role (e.g. health or reflection, if ever added): any token
            if matches:
                return handler
        elif role in matches:
            return handler
        elif matches:
            other = next(iter(matches))
            return _abort_like(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {other} token cannot call {service}: that needs the {role} token ({ROLE_FLAGS[role]})",
            )
        reason = "missing token" if not given else "wrong token"
        return _abort_like(handler, grpc.StatusCode.UNAUTHENTICATED, f"{reason}: pass --token-file or set PARLE_TOKEN")
