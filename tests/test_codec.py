"""The tensor codec and the proto contract: round trips, chunking, compression, every rejection path,
and the proto conventions (a comment on every declaration, enums start at *_UNSPECIFIED = 0)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import parle_pb2 as pb
from protos.codec import (
    MAX_CHUNK_BYTES,
    CodecError,
    CodecTooLarge,
    TensorAssembler,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    to_proto_dtype,
    wire_bytes,
)

PROTO = Path(__file__).resolve().parent.parent / "protos" / "parle.proto"
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.uint8,
    torch.int32,
    torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4)]


def make(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    low, high = (0, 256) if dtype == torch.uint8 else (-(2**31), 2**31 - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def roundtrip(named: list[tuple[str, torch.Tensor]], **kwargs: object) -> dict[str, torch.Tensor]:
    headers, chunks = encode_tensors(named, **kwargs)  # type: ignore[arg-type]
    return decode_tensors(headers, chunks)


def encoded(named: list[tuple[str, torch.Tensor]], chunk_bytes: int = 16) -> tuple[list, list]:
    headers, chunks = encode_tensors(named, chunk_bytes=chunk_bytes)
    return headers, list(chunks)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype_and_shape(dtype: torch.dtype) -> None:
    named = [(f"t{i}", make(dtype, shape, seed=i)) for i, shape in enumerate(SHAPES)]
    out = roundtrip(named, chunk_bytes=5)  # odd chunk size: elements straddle chunk boundaries
    assert list(out) == [name for name, _ in named]
    for name, tensor in named:
        assert out[name].dtype == dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor), name


def test_roundtrip_extreme_values_bit_exact() -> None:
    values = [0.0, -0.0, 1e-45, -3.4e38, 3.4e38, float("inf"), float("-inf")]
    tensor = torch.tensor(values, dtype=torch.float32)
    out = roundtrip([("x", tensor)])["x"]
    assert torch.equal(out.view(torch.int32), tensor.view(torch.int32))
    ints = torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64)
    assert torch.equal(roundtrip([("i", ints)])["i"], ints)


def test_noncontiguous_and_grad_tensors_are_sent_as_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weight = torch.nn.Parameter(torch.randn(3, 2))
    out = roundtrip([("t", base.t()), ("w", weight)])
    assert torch.equal(out["t"], base.t()) and out["t"].is_contiguous()
    assert torch.equal(out["w"], weight.detach()) and not out["w"].requires_grad


def test_five_mib_tensor_splits_into_bounded_chunks() -> None:
    tensor = torch.arange(5 * (1 << 20) // 4, dtype=torch.float32)
    headers, chunks = encode_tensors([("flat", tensor)], sha256=True)
    chunk_list = list(chunks)
    assert headers[0].total_bytes == 5 * (1 << 20) == wire_bytes(headers)
    assert len(chunk_list) == headers[0].num_chunks >= 5
    assert all(len(c.data) <= MAX_CHUNK_BYTES for c in chunk_list)
    assert [c.chunk_index for c in chunk_list] == list(range(len(chunk_list)))
    assert torch.equal(decode_tensors(headers, chunk_list, expected={"flat": tensor})["flat"], tensor)


def test_empty_and_zero_d_tensors_need_no_or_one_chunk() -> None:
    headers, chunks = encoded([("empty", torch.empty(0, 4)), ("scalar", torch.tensor(2.5))])
    assert [h.num_chunks for h in headers] == [0, 1]
    assert [(c.tensor_index, c.chunk_index) for c in chunks] == [(1, 0)]
    out = decode_tensors(headers, chunks)
    assert out["empty"].shape == (0, 4) and out["scalar"].shape == () and out["scalar"].item() == 2.5


def test_empty_set_roundtrips() -> None:
    headers, chunks = encode_tensors([])
    assert headers == [] and list(chunks) == []
    assembler = TensorAssembler([])
    assert assembler.done and assembler.finish() == {}


@pytest.mark.parametrize(
    ("compression", "wire", "rtol"),
    [(pb.COMPRESSION_FP16, torch.float16, 2**-11), (pb.COMPRESSION_BF16, torch.bfloat16, 2**-8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compression_halves_bytes_within_tolerance(
    compression: pb.Compression, wire: torch.dtype, rtol: float, dtype: torch.dtype
) -> None:
    tensor = make(dtype, (1000,))
    steps = torch.arange(5, dtype=torch.int64)
    headers, chunks = encode_tensors([("w", tensor), ("steps", steps)], compression)
    assert headers[0].total_bytes * (dtype.itemsize // 2) == tensor.numel() * tensor.element_size()
    assert headers[0].dtype == to_proto_dtype(dtype) and headers[0].compression == compression
    assert headers[1].compression == pb.COMPRESSION_NONE  # integers are never narrowed
    out = decode_tensors(headers, chunks)
    assert out["w"].dtype == dtype and torch.equal(out["steps"], steps)
    torch.testing.assert_close(out["w"], tensor, rtol=rtol, atol=0.0)
    assert torch.equal(out["w"], tensor.to(wire).to(dtype))


def test_half_precision_tensors_are_not_renarrowed() -> None:
    tensor = make(torch.float16, (10,))
    headers, chunks = encode_tensors([("h", tensor)], pb.COMPRESSION_BF16)
    assert headers[0].compression == pb.COMPRESSION_NONE
    assert torch.equal(decode_tensors(headers, chunks)["h"], tensor)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    chunk_bytes=st.integers(1, 64),
    compression=st.sampled_from([pb.COMPRESSION_NONE, pb.COMPRESSION_FP16, pb.COMPRESSION_BF16]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(
    dtype: torch.dtype, shape: tuple[int, ...], chunk_bytes: int, compression: pb.Compression, seed: int
) -> None:
    tensor = make(dtype, shape, seed)
    headers, chunks = encode_tensors(
        [("a", tensor), ("b", tensor.flip(0) if shape else tensor)], compression, chunk_bytes
    )
    chunk_list = list(chunks)
    assert len(chunk_list) == sum(math.ceil(h.total_bytes / chunk_bytes) for h in headers)
    assert all(len(c.data) <= chunk_bytes for c in chunk_list)
    out = decode_tensors(headers, chunk_list, expected={"a": tensor, "b": TensorSpec.of(tensor)})
    narrowed = compression != pb.COMPRESSION_NONE and dtype in (torch.float32, torch.float64)
    want = (
        tensor.to(torch.float16 if compression == pb.COMPRESSION_FP16 else torch.bfloat16).to(dtype)
        if narrowed
        else tensor
    )
    assert out["a"].dtype == dtype and torch.equal(out["a"], want)


# -- rejections ----------------------------------------------------------------------------------


def feed(headers: list, chunks: list, **kwargs: object) -> dict[str, torch.Tensor]:
    assembler = TensorAssembler(headers, **kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        assembler.add_chunk(chunk)
    return assembler.finish()


def chunk(tensor_index: int, chunk_index: int, data: bytes) -> pb.TensorChunk:
    return pb.TensorChunk(tensor_index=tensor_index, chunk_index=chunk_index, data=data)


TWO = [("a", torch.arange(10, dtype=torch.float32)), ("b", torch.arange(3, dtype=torch.int64))]


def test_short_stream_is_incomplete() -> None:
    headers, chunks = encoded(TWO)  # a: 40 bytes in 3 chunks, b: 24 bytes in 2
    with pytest.raises(CodecError, match=r"incomplete: tensor 'b' \(index 1.*has 16 of 24 bytes \(chunk 1 of 2"):
        feed(headers, chunks[:-1])
    with pytest.raises(CodecError, match=r"tensor 'a'.*0 of 40 bytes.*not started: \['b'\]"):
        feed(headers, [])


def test_short_chunk_is_rejected_when_the_last_arrives() -> None:
    headers, chunks = encoded(TWO)
    chunks[1] = chunk(0, 1, chunks[1].data[:-4])
    with pytest.raises(CodecError, match=r"tensor 'a' \(index 0.*all 3 chunks arrived but carried 36 of 40 bytes"):
        feed(headers, chunks)


def test_long_stream_is_rejected() -> None:
    headers, chunks = encoded(TWO)
    with pytest.raises(CodecError, match=r"tensor 'b' \(index 1.*got chunk 2 after all 2 chunks \(24 bytes\)"):
        feed(headers, [*chunks, chunk(1, 2, b"\0" * 8)])
    with pytest.raises(CodecError, match=r"tensor 'a'.*chunk 2 brings it to 44 bytes, more than the 40 declared"):
        feed(headers, [*chunks[:2], chunk(0, 2, b"\0" * 12)])
    with pytest.raises(CodecError, match=r"set has 2 tensors \(indices 0\.\.1\)"):
        feed(headers, [*chunks, chunk(2, 0, b"")])


def test_out_of_order_and_unknown_index_are_rejected() -> None:
    headers, chunks = encoded(TWO)
    with pytest.raises(
        CodecError, match=r"out of order: expected chunk 1 of tensor 'a'.*got chunk 2 of tensor index 0"
    ):
        feed(headers, [chunks[0], chunks[2]])
    with pytest.raises(CodecError, match=r"expected chunk 0 of tensor 'a'.*got chunk 0 of tensor index 1"):
        feed(headers, [chunks[3]])
    with pytest.raises(CodecError, match=r"names tensor_index 7, but the set has 2 tensors"):
        feed(headers, [chunk(7, 0, b"x")])


def test_rejected_assembler_stays_spent() -> None:
    headers, chunks = encoded(TWO)
    assembler = TensorAssembler(headers, context="coupled average from w1, round 3")
    with pytest.raises(CodecError, match=r"^coupled average from w1, round 3: chunk out of order"):
        assembler.add_chunk(chunks[1])
    with pytest.raises(CodecError, match="previous chunk was rejected"):
        assembler.add_chunk(chunks[0])
    with pytest.raises(CodecError, match="previous chunk was rejected"):
        assembler.finish()


def test_expected_spec_mismatch_is_rejected() -> None:
    headers, _ = encoded(TWO)
    with pytest.raises(
        CodecError, match=r"tensor 'a' \(index 0, float32, shape \[10\]\): expected float32 shape \[2, 5\]"
    ):
        TensorAssembler(headers, expected={"a": TensorSpec(torch.float32, (2, 5)), "b": TWO[1][1]})
    with pytest.raises(CodecError, match=r"tensor 'b'.*int64.*expected float32 shape \[3\]"):
        TensorAssembler(headers, expected={"a": TWO[0][1], "b": torch.zeros(3)})
    with pytest.raises(CodecError, match=r"missing \['c'\], extra \['b'\]"):
        TensorAssembler(headers, expected={"a": TWO[0][1], "c": TWO[1][1]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected_when_required(bad: float) -> None:
    tensor = torch.zeros(100)
    tensor[17] = bad
    headers, chunks = encoded([("flat", tensor)])
    assert torch.equal(feed(headers, chunks)["flat"].isnan(), tensor.isnan())  # allowed by default
    with pytest.raises(CodecError, match=r"tensor 'flat'.*1 of 100 values are NaN or Inf \(first at flat index 17"):
        feed(headers, chunks, require_finite=True)


def test_fp16_overflow_names_the_cause() -> None:
    headers, chunks = encode_tensors([("flat", torch.tensor([1.0, 1e6]))], pb.COMPRESSION_FP16)
    with pytest.raises(CodecError, match=r"value inf.*BF16 keeps float32's range"):
        decode_tensors(headers, chunks, require_finite=True)


def test_bad_headers_are_rejected() -> None:
    def header(**fields: object) -> pb.TensorHeader:
        base = {"name": "w", "dtype": pb.DTYPE_FLOAT32, "shape": [4], "total_bytes": 16, "num_chunks": 1}
        return pb.TensorHeader(**{**base, **fields})  # type: ignore[arg-type]

    cases = [
        (header(dtype=pb.DTYPE_UNSPECIFIED), r"dtype DTYPE_UNSPECIFIED \(0\) is not supported"),
        (header(dtype=99), r"dtype 99 is not supported"),
        (header(total_bytes=15), r"total_bytes is 15 but shape \[4\] of wire dtype float32 needs 16"),
        (header(compression=pb.COMPRESSION_FP16), r"total_bytes is 16 but .* float16 needs 8"),
        (
            header(dtype=pb.DTYPE_INT64, total_bytes=32, compression=pb.COMPRESSION_BF16),
            r"compression COMPRESSION_BF16 applies only to float32/float64, not int64",
        ),
        (header(compression=42), r"unknown compression 42"),
        (header(shape=[-1, 4]), r"shape \[-1, 4\] has a negative dimension"),
        (header(num_chunks=0), r"num_chunks is 0 but 16 bytes .* need between 1 and 16"),
        (header(sha256=b"abc"), r"sha256 has 3 bytes"),
    ]
    for bad, message in cases:
        with pytest.raises(CodecError, match=r"tensor 'w' \(index 0\): " + message):
            TensorAssembler([bad])
    with pytest.raises(CodecError, match=r"non-empty and unique, got \['w', 'w'\]"):
        TensorAssembler([header(), header()])


def test_size_limits_raise_too_large() -> None:
    headers, _ = encoded(TWO, chunk_bytes=20)  # a: 40 bytes in 2 chunks
    with pytest.raises(CodecTooLarge, match=r"tensor set has 64 bytes, more than the limit of 63"):
        TensorAssembler(headers, max_total_bytes=63)
    with pytest.raises(CodecTooLarge, match=r"tensor 'a'.*chunk 0 has 40 bytes, more than the limit of 32"):
        feed(headers, [chunk(0, 0, b"\0" * 40)], max_chunk_bytes=32)
    with pytest.raises(CodecError, match=r"num_chunks is 2 but 40 bytes in chunks of at most 16"):
        TensorAssembler(headers, max_chunk_bytes=16)


def test_sha256_mismatch_and_bad_bool_bytes_are_rejected() -> None:
    headers, chunks = encode_tensors([("w", torch.ones(4))], sha256=True)
    corrupt = [chunk(0, 0, b"\0" * 16)]
    with pytest.raises(CodecError, match=r"tensor 'w'.*sha256 of the received bytes does not match"):
        decode_tensors(headers, corrupt)
    assert torch.equal(decode_tensors(headers, chunks)["w"], torch.ones(4))
    headers, _ = encode_tensors([("mask", torch.ones(2, dtype=torch.bool))])
    with pytest.raises(CodecError, match=r"bool bytes must be 0 or 1, found 7"):
        decode_tensors(headers, [chunk(0, 0, b"\x01\x07")])


def test_encoder_rejects_what_it_cannot_send() -> None:
    with pytest.raises(CodecError, match=r"dtype torch.complex64 cannot be sent; supported: float32"):
        encode_tensors([("z", torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(CodecError, match=r"name 'a' is empty or repeated"):
        encode_tensors([("a", torch.zeros(1)), ("a", torch.zeros(1))])
    with pytest.raises(CodecError, match=r"chunk_bytes must be in 1\.\.1048576, got 2097152"):
        encode_tensors([("a", torch.zeros(1))], chunk_bytes=2 * MAX_CHUNK_BYTES)


# -- the proto contract --------------------------------------------------------------------------


def test_generated_modules_import_and_are_current() -> None:
    from protos import generate, parle_pb2_grpc

    assert pb.DESCRIPTOR.package == "parle.v1"
    assert {s for s in pb.DESCRIPTOR.services_by_name} == {"Coordinator", "Jobs"}
    for service in ("Coordinator", "Jobs"):
        assert hasattr(parle_pb2_grpc, f"{service}Stub") and hasattr(parle_pb2_grpc, f"add_{service}Servicer_to_server")
    assert generate.stale_outputs() == [], "stale stubs: run python -m protos.generate"


FIELD = re.compile(r"^(optional\s+|repeated\s+)?[A-Za-z_][\w.]*\s+\w+\s*=\s*\d+\s*;")
ENUM_VALUE = re.compile(r"^[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;")
BLOCK = re.compile(r"^(message|enum|service|oneof|rpc)\s+\w+")


def test_every_declaration_in_the_proto_has_a_comment() -> None:
    previous = ""
    uncommented: list[str] = []
    counts = {"field": 0, "value": 0}
    for number, raw in enumerate(PROTO.read_text().splitlines(), start=1):
        line = raw.strip()
        kind = "field" if FIELD.match(line) else "value" if ENUM_VALUE.match(line) else None
        if kind:
            counts[kind] += 1
        if (kind or BLOCK.match(line)) and "//" not in line and not previous.startswith("//"):
            uncommented.append(f"line {number}: {line}")
        if line:
            previous = line
    assert uncommented == [], "declarations without a comment:\n" + "\n".join(uncommented)
    # The text scan must see every field and enum value the compiler saw.
    messages = pb.DESCRIPTOR.message_types_by_name.values()
    enums = pb.DESCRIPTOR.enum_types_by_name.values()
    assert counts["field"] == sum(len(m.fields) for m in messages)
    assert counts["value"] == sum(len(e.values) for e in enums)


def test_every_enum_starts_with_unspecified_zero() -> None:
    enums = pb.DESCRIPTOR.enum_types_by_name.values()
    assert len(enums) >= 7
    for enum in enums:
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
