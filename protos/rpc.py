"""gRPC plumbing shared by the worker transport and the jobs client (no torch: client commands start fast)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from protos.messages import CoordinatorError

T = TypeVar("T")


def open_channel(address: str, ca_cert: Path | None = None) -> grpc.Channel:
    options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_permit_without_calls", 1)]
    if ca_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca_cert.read_bytes())
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


def call(fn: Callable[[], T]) -> T:
    """Run an RPC, turning ``grpc.RpcError`` into ``CoordinatorError(status name, details)``."""
    try:
        return fn()
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        raise CoordinatorError(code.name, err.details() if hasattr(err, "details") else str(err)) from None
