"""How a handler's failure becomes a gRPC status: typed client errors (``CoordinatorError``, bad specs, bad
tensors) answer their own code and message; anything else is a coordinator bug, answered INTERNAL with a
logged traceback and a metric, never dressed up as the client's fault."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from coordinator import metrics
from coordinator.logtext import capped
from protos.codec import (
    CodecError,
    CodecTooLarge,
)
from protos.messages import CoordinatorError
from protos.spec import SpecError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _reject(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    metrics.REJECTED.labels(code.name.lower()).inc()
    log.info("rejected (%s): %s", code.name, capped(message))
    context.abort(code, message)


def _internal(context: grpc.ServicerContext, method: str, err: Exception) -> None:
    """A bug of ours, not the caller's: INTERNAL, with the traceback in the log and a metric to alert on."""
    metrics.INTERNAL_ERRORS.labels(method).inc()
    log.error("internal error in %s", method, exc_info=err)
    context.abort(
        grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(err).__name__}); the coordinator logged it"
    )


def guarded(handler: Callable[..., T]) -> Callable[..., T]:
    """Map the project's errors to gRPC status codes (unary and streaming handlers alike).

    Only the typed errors that validation raises are the client's fault: ``CoordinatorError`` (its own
    code), ``CodecError`` and ``SpecError`` (INVALID_ARGUMENT; too large: RESOURCE_EXHAUSTED). Anything
    else, a ValueError or KeyError included, is a bug of the coordinator's and answers INTERNAL."""
    method = handler.__name__

    def translate(context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, CoordinatorError):
            _reject(context, grpc.StatusCode[err.code], str(err))
        elif isinstance(err, CodecTooLarge):
            _reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        elif isinstance(err, (CodecError, SpecError)):
            _reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        elif isinstance(err, grpc.RpcError) or context.code() is not None:
            raise err  # the client went away mid-stream, or the call was already aborted: nothing to answer
        else:
            _internal(context, method, err)
        raise err

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = handler(self, request, context)
            if isinstance(result, Iterator):
                return _guard_stream(result, context, translate)
            return result
        except Exception as err:
            translate(context, err)
            raise

    return wrapper


def _guard_stream(stream: Iterator[T], context: grpc.ServicerContext, translate: Callable[..., None]) -> Iterator[T]:
    try:
        yield from stream
    except Exception as err:
        translate(context, err)
        raise


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CoordinatorError("INVALID_ARGUMENT", message)
