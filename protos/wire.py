"""Conversions between ``protos.messages`` and the generated proto messages, shared by the gRPC server
and the gRPC worker transport, plus the chunk-stream helpers both sides use."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from protos import parle_pb2 as pb
from protos.codec import CodecError, TensorAssembler, TensorSpec
from protos.messages import Directives, RoundValues

COMPRESSION = {"none": pb.COMPRESSION_NONE, "fp16": pb.COMPRESSION_FP16, "bf16": pb.COMPRESSION_BF16}
SPLITS = {"train": pb.SPLIT_TRAIN, "validation": pb.SPLIT_VALIDATION, "test": pb.SPLIT_TEST}
SPLIT_NAMES = {v: k for k, v in SPLITS.items()}
JOB_STATES = {
    "pending": pb.JOB_STATE_PENDING,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}


def values_to_pb(v: RoundValues) -> pb.RoundValues:
    return pb.RoundValues(round=v.round, gamma=v.gamma, rho=v.rho, lr=v.lr, epoch=v.epoch)


def values_from_pb(v: pb.RoundValues) -> RoundValues:
    return RoundValues(round=v.round, gamma=v.gamma, rho=v.rho, lr=v.lr, epoch=v.epoch)


def directives_to_pb(d: Directives) -> pb.Directives:
    return pb.Directives(evaluate=d.evaluate, checkpoint=d.checkpoint, stop=d.stop, export=d.export, model=d.model)


def directives_from_pb(d: pb.Directives) -> Directives:
    return Directives(evaluate=d.evaluate, checkpoint=d.checkpoint, stop=d.stop, export=d.export, model=d.model)


def tensor_chunks(chunks: Iterable[pb.TensorChunk], wrap: type) -> Iterator[Any]:
    """Each TensorChunk wrapped in its stream's message type (JoinChunk, ExchangeChunk, ...)."""
    for chunk in chunks:
        yield wrap(chunk=chunk)


def receive_tensors(
    headers: Iterable[pb.TensorHeader],
    messages: Iterator[Any],
    *,
    expected: Mapping[str, TensorSpec | Tensor] | None = None,
    require_finite: bool = False,
    max_total_bytes: int | None = None,
    context: str = "",
) -> dict[str, Tensor]:
    """Read exactly the chunks ``headers`` announce from a stream of oneof messages carrying ``chunk``.

    Raises ``CodecError`` for a short, long, out-of-order or malformed set."""
    assembler = TensorAssembler(
        list(headers),
        expected=expected,
        require_finite=require_finite,
        max_total_bytes=max_total_bytes,
        context=context,
    )
    while not assembler.done:
        message = next(messages, None)
        if message is None:
            break  # finish() reports what is missing
        kind = message.WhichOneof("payload")
        if kind != "chunk":
            raise CodecError(f"{context}: expected a tensor chunk, got {kind or 'an empty message'}")
        assembler.add_chunk(message.chunk)
    return assembler.finish()


def expect_end(messages: Iterator[Any], context: str) -> None:
    """A client stream must end after the chunks its header announced."""
    if next(messages, None) is not None:
        raise CodecError(f"{context}: more chunks than the header announced")
