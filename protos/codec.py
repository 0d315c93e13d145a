"""Tensors <-> chunked little-endian bytes for ``parle.proto`` (the wire rules are in its header).

A tensor set travels as a list of ``TensorHeader`` (name, dtype, shape, byte count, chunk count,
optional SHA-256) followed by ``TensorChunk`` messages of raw bytes, at most ``MAX_CHUNK_BYTES`` each,
because gRPC's default receive limit (4 MiB) includes framing. Nothing is ever pickled.

Sending::

    headers, chunks = encode_tensors([("flat", mu)], compression=pb.COMPRESSION_BF16)
    # put headers in the stream's first message, then one message per chunk

Receiving::

    asm = TensorAssembler(first.tensors, expected={"flat": reference}, require_finite=True)
    for chunk in rest:
        asm.add_chunk(chunk)
    tensors = asm.finish()

Every malformed input raises ``CodecError`` (a ``ValueError``; servers map it to INVALID_ARGUMENT)
naming the tensor, its index, and what was expected versus received; ``CodecTooLarge`` (a subclass)
marks size limits (RESOURCE_EXHAUSTED).

Byte order: the wire is little-endian and tensors are sent as their in-memory bytes, so this module
refuses to import on a big-endian host rather than silently corrupting weights.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from protos import parle_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI host
    raise ImportError("protos.codec sends tensors' in-memory bytes as little-endian; this host is big-endian")

MAX_CHUNK_BYTES = 1 << 20
SHA256_BYTES = 32

_TORCH_DTYPES: dict[pb.DType, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_BOOL: torch.bool,
}
_PROTO_DTYPES = {torch_dtype: proto for proto, torch_dtype in _TORCH_DTYPES.items()}
# Wire dtype of each narrowing compression; only these source dtypes are narrowed, because narrowing a
# 16-bit float to the other 16-bit format would lose range or precision for no saving.
_NARROWED: dict[int, torch.dtype] = {pb.COMPRESSION_FP16: torch.float16, pb.COMPRESSION_BF16: torch.bfloat16}
_NARROWABLE = (torch.float32, torch.float64)


class CodecError(ValueError):
    """A tensor set that cannot be encoded or decoded; the message names the tensor and the problem."""


class CodecTooLarge(CodecError):
    """A chunk or tensor set beyond the receiver's size limits (maps to RESOURCE_EXHAUSTED)."""


class EncodedTensors(NamedTuple):
    """Headers for the stream's first message, and the chunks to send after it, lazily."""

    headers: list[pb.TensorHeader]
    chunks: Iterator[pb.TensorChunk]


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor: its (decoded) dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


def to_proto_dtype(dtype: torch.dtype) -> pb.DType:
    """The wire enum of a torch dtype; ``CodecError`` for dtypes the wire does not carry."""
    try:
        return _PROTO_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(_short(d) for d in _PROTO_DTYPES)
        raise CodecError(f"dtype {dtype} cannot be sent; supported: {supported}") from None


def to_torch_dtype(dtype: pb.DType) -> torch.dtype:
    """The torch dtype of a wire enum value; ``CodecError`` for unknown or unspecified values."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise CodecError(f"unknown or unspecified DType {_enum_name(pb.DType, dtype)}") from None


def wire_bytes(headers: Iterable[pb.TensorHeader]) -> int:
    """Total payload bytes of a tensor set (for metrics such as bytes sent)."""
    return sum(h.total_bytes for h in headers)


def encode_tensors(
    named: Sequence[tuple[str, torch.Tensor]],
    compression: pb.Compression = pb.COMPRESSION_NONE,
    chunk_bytes: int = MAX_CHUNK_BYTES,
    *,
    sha256: bool = False,
) -> EncodedTensors:
    """Describe ``named`` tensors and chunk their bytes.

    Contiguous CPU tensors are read in place (a byte view; the only copy is each chunk's ``bytes``),
    so the caller must not modify them until ``chunks`` is consumed. Device or non-contiguous tensors
    are copied once; with FP16/BF16 compression, float32/float64 tensors are narrowed (on their
    device, so a GPU tensor crosses to the host at half size) and the header keeps the original dtype.
    ``sha256`` adds a digest of each tensor's wire bytes (one extra pass over the data).
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    if compression not in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE, *_NARROWED):
        raise CodecError(f"unknown compression {_enum_name(pb.Compression, compression)}")
    headers: list[pb.TensorHeader] = []
    views: list[np.ndarray] = []
    seen: set[str] = set()
    for index, (name, tensor) in enumerate(named):
        if not name or name in seen:
            raise CodecError(f"tensor {index}: name {name!r} is empty or repeated; names must be unique")
        seen.add(name)
        header, view = wire_view(name, tensor, compression, chunk_bytes)
        if sha256:
            header.sha256 = hashlib.sha256(view.data).digest()
        headers.append(header)
        views.append(view)
    return EncodedTensors(headers, _iter_chunks(views, chunk_bytes))


def wire_view(
    name: str,
    tensor: torch.Tensor,
    compression: pb.Compression = pb.COMPRESSION_NONE,
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> tuple[pb.TensorHeader, np.ndarray]:
    """One tensor's header and its wire bytes as a flat uint8 array: the tensor's own memory when it is a
    contiguous CPU tensor sent uncompressed (the data channel sends from it without a copy), else a copy
    (narrowed on the tensor's device first, so a GPU tensor crosses to the host at half size)."""
    dtype = to_proto_dtype(tensor.dtype)
    applied = compression if compression in _NARROWED and tensor.dtype in _NARROWABLE else None
    wire = tensor.detach()
    if applied is not None:
        wire = wire.to(_NARROWED[applied])
    view = _byte_view(wire.to("cpu"))
    header = pb.TensorHeader(
        name=name,
        dtype=dtype,
        shape=list(tensor.shape),
        total_bytes=view.size,
        num_chunks=math.ceil(view.size / chunk_bytes),
        compression=pb.COMPRESSION_NONE if applied is None else applied,
    )
    return header, view


@dataclass(frozen=True)
class WireLayout:
    """What a validated header announces: the decoded dtype, the dtype on the wire, the shape."""

    dtype: torch.dtype
    wire_dtype: torch.dtype
    shape: tuple[int, ...]


def check_headers(
    headers: Sequence[pb.TensorHeader],
    *,
    expected: Mapping[str, TensorSpec | torch.Tensor] | None = None,
    max_total_bytes: int | None = None,
    context: str = "",
) -> list[WireLayout]:
    """Validate a header set exactly as ``TensorAssembler`` does, without allocating anything (for
    receivers that read the bytes themselves, such as the data channel); raises ``CodecError``."""
    assembler = TensorAssembler(
        headers, expected=expected, max_total_bytes=max_total_bytes, context=context, allocate=False
    )
    return [WireLayout(slot.dtype, slot.wire_dtype, slot.shape) for slot in assembler._slots]


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 array over the tensor's bytes; copies only when the tensor is not contiguous."""
    # Viewing as uint8 in torch (not numpy) also covers bfloat16, which numpy has no dtype for.
    flat: np.ndarray = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat


def _iter_chunks(views: list[np.ndarray], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for tensor_index, view in enumerate(views):
        for chunk_index, start in enumerate(range(0, view.size, chunk_bytes)):
            data = view[start : start + chunk_bytes].tobytes()
            yield pb.TensorChunk(tensor_index=tensor_index, chunk_index=chunk_index, data=data)


def decode_tensors(
    headers: Sequence[pb.TensorHeader],
    chunks: Iterable[pb.TensorChunk],
    *,
    expected: Mapping[str, TensorSpec | torch.Tensor] | None = None,
    require_finite: bool = False,
    context: str = "",
) -> dict[str, torch.Tensor]:
    """Assemble a whole tensor set at once (see ``TensorAssembler`` for the arguments)."""
    assembler = TensorAssembler(headers, expected=expected, require_finite=require_finite, context=context)
    for chunk in chunks:
        assembler.add_chunk(chunk)
    return assembler.finish()


@dataclass
class _Slot:
    """Receiving state of one tensor."""

    index: int
    name: str
    dtype: torch.dtype
    wire_dtype: torch.dtype
    shape: tuple[int, ...]
    header: pb.TensorHeader
    buffer: torch.Tensor | None = None  # flat, wire dtype; allocated when its first byte is due
    raw: np.ndarray | None = None  # uint8 view of buffer, where chunks are copied to
    received: int = 0
    next_chunk: int = 0

    def describe(self) -> str:
        return f"tensor {self.name!r} (index {self.index}, {_short(self.dtype)}, shape {list(self.shape)})"


class TensorAssembler:
    """Rebuilds a tensor set from its headers and in-order chunks, validating as it goes.

    Chunks are copied straight into one preallocated buffer per tensor (no concatenation), so memory
    is the set's size and time is linear. ``expected`` maps each name to a ``TensorSpec`` or a
    template tensor; the header set must match it exactly. ``context`` (e.g. "coupled average from
    worker w1, round 7") prefixes every error message. After a ``CodecError`` the assembler is spent.
    """

    def __init__(
        self,
        headers: Sequence[pb.TensorHeader],
        *,
        expected: Mapping[str, TensorSpec | torch.Tensor] | None = None,
        require_finite: bool = False,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_total_bytes: int | None = None,
        context: str = "",
        allocate: bool = True,
    ) -> None:
        self._prefix = f"{context}: " if context else ""
        self._require_finite = require_finite
        self._max_chunk_bytes = max_chunk_bytes
        self._slots = [self._check_header(i, h) for i, h in enumerate(headers)]
        self._out: dict[str, torch.Tensor] = {}
        self._cursor = 0  # index of the tensor whose next chunk is due
        self._failed = False
        self._check_set(expected, max_total_bytes)
        if allocate:  # False: a header check only (``check_headers``)
            self._advance()

    @property
    def done(self) -> bool:
        """True once every tensor has all its bytes."""
        return self._cursor == len(self._slots)

    def add_chunk(self, chunk: pb.TensorChunk) -> None:
        """Take the next chunk; raises ``CodecError`` if it is not the one due or breaks a limit."""
        if self._failed:
            raise self._error("a previous chunk was rejected; start a new assembler")
        try:
            self._add(chunk)
        except CodecError:
            self._failed = True
            raise

    def finish(self) -> dict[str, torch.Tensor]:
        """The decoded tensors by name, in header order; raises ``CodecError`` if any bytes are missing."""
        if self._failed:
            raise self._error("a previous chunk was rejected; start a new assembler")
        if not self.done:
            slot = self._slots[self._cursor]
            missing = [s.name for s in self._slots[self._cursor + 1 :]]
            rest = f"; not started: {missing}" if missing else ""
            raise self._error(
                f"incomplete: {slot.describe()} has {slot.received} of {slot.header.total_bytes} bytes "
                f"(chunk {slot.next_chunk} of {slot.header.num_chunks} is next){rest}"
            )
        return dict(self._out)

    # -- validation of the headers -------------------------------------------------------------

    def _error(self, message: str, cls: type[CodecError] = CodecError) -> CodecError:
        return cls(self._prefix + message)

    def _check_header(self, index: int, header: pb.TensorHeader) -> _Slot:
        where = f"tensor {header.name!r} (index {index})"
        if header.dtype not in _TORCH_DTYPES:
            supported = ", ".join(pb.DType.Name(d) for d in _TORCH_DTYPES)
            got = _enum_name(pb.DType, header.dtype)
            raise self._error(f"{where}: dtype {got} is not supported; use one of {supported}")
        dtype = _TORCH_DTYPES[header.dtype]
        wire_dtype = self._wire_dtype(where, dtype, header.compression)
        if any(d < 0 for d in header.shape):
            raise self._error(f"{where}: shape {list(header.shape)} has a negative dimension")
        shape = tuple(header.shape)
        needed = math.prod(shape) * wire_dtype.itemsize
        if header.total_bytes != needed:
            raise self._error(
                f"{where}: total_bytes is {header.total_bytes} but shape {list(shape)} of wire dtype "
                f"{_short(wire_dtype)} needs {needed}"
            )
        least = math.ceil(needed / self._max_chunk_bytes)
        if not least <= header.num_chunks <= needed:
            raise self._error(
                f"{where}: num_chunks is {header.num_chunks} but {needed} bytes in chunks of at most "
                f"{self._max_chunk_bytes} bytes need between {least} and {needed}"
            )
        if len(header.sha256) not in (0, SHA256_BYTES):
            raise self._error(f"{where}: sha256 has {len(header.sha256)} bytes, expected 0 or {SHA256_BYTES}")
        return _Slot(index, header.name, dtype, wire_dtype, shape, header)

    def _wire_dtype(self, where: str, dtype: torch.dtype, compression: int) -> torch.dtype:
        if compression in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE):
            return dtype
        if compression not in _NARROWED:
            raise self._error(f"{where}: unknown compression {_enum_name(pb.Compression, compression)}")
        if dtype not in _NARROWABLE:
            raise self._error(
                f"{where}: compression {pb.Compression.Name(compression)} applies only to float32/float64, "
                f"not {_short(dtype)}"
            )
        return _NARROWED[compression]

    def _check_set(self, expected: Mapping[str, TensorSpec | torch.Tensor] | None, limit: int | None) -> None:
        names = [slot.name for slot in self._slots]
        if "" in names or len(set(names)) != len(names):
            raise self._error(f"tensor names must be non-empty and unique, got {names}")
        total = sum(slot.header.total_bytes for slot in self._slots)
        if limit is not None and total > limit:
            raise self._error(f"the tensor set has {total} bytes, more than the limit of {limit}", CodecTooLarge)
        if expected is None:
            return
        missing = [name for name in expected if name not in names]
        extra = [name for name in names if name not in expected]
        if missing or extra:
            raise self._error(f"expected tensors {list(expected)}, got {names} (missing {missing}, extra {extra})")
        for slot in self._slots:
            want = expected[slot.name]
            spec = TensorSpec.of(want) if isinstance(want, torch.Tensor) else want
            if (slot.dtype, slot.shape) != (spec.dtype, spec.shape):
                raise self._error(f"{slot.describe()}: expected {_short(spec.dtype)} shape {list(spec.shape)}")

    # -- chunks ---------------------------------------------------------------------------------

    def _add(self, chunk: pb.TensorChunk) -> None:
        index, number, size = chunk.tensor_index, chunk.chunk_index, len(chunk.data)
        if index >= len(self._slots):
            raise self._error(
                f"chunk {number} names tensor_index {index}, but the set has {len(self._slots)} tensors "
                f"(indices 0..{len(self._slots) - 1})"
            )
        if index < self._cursor:
            slot = self._slots[index]
            raise self._error(
                f"{slot.describe()}: got chunk {number} after all {slot.header.num_chunks} chunks "
                f"({slot.header.total_bytes} bytes) arrived; the sender sent too much"
            )
        slot = self._slots[self._cursor]
        if index != self._cursor or number != slot.next_chunk:
            raise self._error(
                f"chunk out of order: expected chunk {slot.next_chunk} of {slot.describe()}, "
                f"got chunk {number} of tensor index {index}"
            )
        if size > self._max_chunk_bytes:
            raise self._error(
                f"{slot.describe()}: chunk {number} has {size} bytes, more than the limit of {self._max_chunk_bytes}",
                CodecTooLarge,
            )
        end = slot.received + size
        if end > slot.header.total_bytes:
            raise self._error(
                f"{slot.describe()}: chunk {number} brings it to {end} bytes, more than the "
                f"{slot.header.total_bytes} declared"
            )
        assert slot.raw is not None  # allocated by _advance when the tensor became current
        slot.raw[slot.received : end] = np.frombuffer(chunk.data, np.uint8)
        slot.received, slot.next_chunk = end, number + 1
        if slot.next_chunk == slot.header.num_chunks:
            if slot.received != slot.header.total_bytes:
                raise self._error(
                    f"{slot.describe()}: all {slot.header.num_chunks} chunks arrived but carried "
                    f"{slot.received} of {slot.header.total_bytes} bytes; the sender sent too little"
                )
            self._complete(slot)
            self._cursor += 1
            self._advance()

    def _advance(self) -> None:
        """Complete tensors that need no chunks, and allocate the buffer of the next one due."""
        while self._cursor < len(self._slots):
            slot = self._slots[self._cursor]
            if slot.buffer is None:
                slot.buffer = torch.empty(math.prod(slot.shape), dtype=slot.wire_dtype)
                slot.raw = slot.buffer.view(torch.uint8).numpy()
            if slot.header.num_chunks > 0:
                return
            self._complete(slot)
            self._cursor += 1

    def _complete(self, slot: _Slot) -> None:
        assert slot.buffer is not None and slot.raw is not None
        raw = slot.raw
        if slot.header.sha256 and hashlib.sha256(raw.data).digest() != slot.header.sha256:
            raise self._error(f"{slot.describe()}: sha256 of the received bytes does not match the header")
        if slot.dtype == torch.bool and raw.size and int(raw.max()) > 1:
            raise self._error(f"{slot.describe()}: bool bytes must be 0 or 1, found {int(raw.max())}")
        tensor = slot.buffer.view(slot.shape)
        if tensor.dtype != slot.dtype:
            tensor = tensor.to(slot.dtype)
        if self._require_finite and tensor.is_floating_point():
            self._check_finite(slot, tensor)
        self._out[slot.name] = tensor
        # The decoded tensor (or its widened copy) owns the memory now.
        slot.buffer, slot.raw = None, None

    def _check_finite(self, slot: _Slot, tensor: torch.Tensor) -> None:
        bad = ~torch.isfinite(tensor.reshape(-1))
        count = int(bad.sum())
        if count == 0:
            return
        first = int(bad.nonzero()[0, 0])
        hint = ""
        if slot.header.compression == pb.COMPRESSION_FP16:
            hint = "; FP16 compression overflows beyond +-65504, BF16 keeps float32's range"
        raise self._error(
            f"{slot.describe()}: {count} of {tensor.numel()} values are NaN or Inf "
            f"(first at flat index {first}, value {tensor.reshape(-1)[first].item()}){hint}"
        )


def _enum_name(enum: type[pb.DType] | type[pb.Compression], value: int) -> str:
    """``NAME (value)`` for known enum values, the bare number for unknown ones (open proto3 enums)."""
    try:
        return f"{enum.Name(value)} ({value})"
    except ValueError:
        return str(value)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
