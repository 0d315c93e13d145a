"""Malformed requests to a real gRPC coordinator: every one gets its status code and leaves the center untouched.

Every malformed request must be answered with the exact status code the design names (never UNKNOWN or
INTERNAL), the server must stay up, a rejected update must leave the job's reference bitwise unchanged
and its round where it was, and ``parle_rejected_updates_total`` must count the refusal by reason.

The shared job has two replicas: a real worker joined through ``GrpcTransport`` and a raw-stub worker
that builds arbitrary broken streams. Round 0 is closed in the fixture, so the job has a reference.
Requests that could change a job if the server wrongly accepted them run against a fresh job.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from coordinator.job import Job, JobState
from coordinator.server import CoordinatorServer
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import MAX_CHUNK_BYTES, encode_tensors, to_torch_dtype
from protos.messages import RoundStats
from protos.spec import ModelSpec, resolve
from worker.transports.grpc import GrpcTransport
from worker.workloads import build_model, count_parameters

CALL_TIMEOUT = 10.0
N_PARAMS = count_parameters(build_model(ModelSpec(name="lenet"), (1, 28, 28), 10))
FLAT_BYTES = N_PARAMS * 4
HYPOTHESIS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def job_spec(replicas: int, name: str = "t") -> dict[str, Any]:
    return {
        "name": name,
        "preset": "parle",
        "replicas": replicas,
        "epochs": 1,
        "model": {"name": "lenet"},
        "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
        "optim": {"L": 2},
        # The raw-stub workers never heartbeat on their own; they must not lapse during the module.
        "runtime": {"lease_s": 3600.0},
    }


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value("parle_rejected_updates_total", {"reason": reason})
    return value or 0.0


STATS = RoundStats(train_loss=1.0, inner_steps=2, samples=64, chain_seconds=0.01, train_size=256)


@dataclass
class Env:
    server: CoordinatorServer
    channel: grpc.Channel
    coord: pb_grpc.CoordinatorStub
    jobs: pb_grpc.JobsStub
    transport: GrpcTransport
    job_id: str
    worker_id: str  # the raw-stub worker of the shared job

    @property
    def job(self) -> Job:
        return self.server.manager.job(self.job_id)


def join_raw(coord: pb_grpc.CoordinatorStub, job_id: str, name: str = "raw") -> str:
    replies = list(coord.Join(pb.JoinRequest(worker_name=name, device="cpu", job_id=job_id), timeout=CALL_TIMEOUT))
    head = replies[0].header
    assert head.worker_id and head.job_id == job_id
    return str(head.worker_id)


def upload(job_id: str, worker_id: str, round: int, headers: list[pb.TensorHeader]) -> pb.ExchangeChunk:
    return pb.ExchangeChunk(
        upload=pb.ExchangeUpload(
            worker_id=worker_id,
            job_id=job_id,
            round=round,
            train_loss=1.0,
            inner_steps=2,
            samples=64,
            chain_seconds=0.01,
            tensors=headers,
            train_size=256,
        )
    )


def encode(
    mu: torch.Tensor, chunk_bytes: int = MAX_CHUNK_BYTES, sha256: bool = False, compression: int = pb.COMPRESSION_NONE
) -> tuple[list[pb.TensorHeader], list[pb.TensorChunk]]:
    headers, chunks = encode_tensors([("mu", mu)], compression, chunk_bytes=chunk_bytes, sha256=sha256)
    return list(headers), list(chunks)


def as_messages(chunks: list[pb.TensorChunk]) -> list[pb.ExchangeChunk]:
    return [pb.ExchangeChunk(chunk=c) for c in chunks]


def raw_exchange(coord: pb_grpc.CoordinatorStub, messages: list[pb.ExchangeChunk]) -> list[pb.ExchangeChunk]:
    return list(coord.Exchange(iter(messages), timeout=CALL_TIMEOUT))


def valid_exchange(coord: pb_grpc.CoordinatorStub, job_id: str, worker_id: str, round: int, mu: torch.Tensor) -> Any:
    headers, chunks = encode(mu)
    replies = raw_exchange(coord, [upload(job_id, worker_id, round, headers), *as_messages(chunks)])
    return replies[0].download


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    server = CoordinatorServer(tmp_path_factory.mktemp("malformed") / "state")
    channel = grpc.insecure_channel(server.address)
    coord, jobs = pb_grpc.CoordinatorStub(channel), pb_grpc.JobsStub(channel)
    job_id = server.manager.submit(resolve(job_spec(replicas=2)))
    transport = GrpcTransport(server.address, job_id=job_id, timeout_s=30.0)
    try:
        transport.join("real", "cpu")
        worker_id = join_raw(coord, job_id)
        # Round 0: the real worker and the raw worker both report, so the job gets its first reference.
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(reply=transport.exchange(0, torch.zeros(N_PARAMS), STATS))
        )
        thread.start()
        valid_exchange(coord, job_id, worker_id, 0, torch.ones(N_PARAMS))
        thread.join(timeout=30)
        assert "reply" in result
        job = server.manager.job(job_id)
        assert job.round == 1 and job.center is not None and job.center.shape == (N_PARAMS,)
        yield Env(server, channel, coord, jobs, transport, job_id, worker_id)
    finally:
        transport.close()
        channel.close()
        server.close()


@dataclass
class Fresh:
    job_id: str
    worker_id: str
    job: Job


def fresh_job(env: Env, name: str) -> Fresh:
    """A one-replica job of its own with round 0 closed (a reference exists, round == 1)."""
    job_id = env.server.manager.submit(resolve(job_spec(replicas=1, name=name)))
    worker_id = join_raw(env.coord, job_id)
    valid_exchange(env.coord, job_id, worker_id, 0, torch.full((N_PARAMS,), 0.5))
    job = env.server.manager.job(job_id)
    assert job.round == 1 and job.center is not None
    return Fresh(job_id, worker_id, job)


def assert_alive(env: Env, round: int) -> None:
    beat = env.coord.Heartbeat(pb.HeartbeatRequest(worker_id=env.worker_id, job_id=env.job_id), timeout=CALL_TIMEOUT)
    assert beat.job_state == pb.JOB_STATE_RUNNING and not beat.stop
    info = env.jobs.Get(pb.GetRequest(job_id=env.job_id), timeout=CALL_TIMEOUT)
    assert info.state == pb.JOB_STATE_RUNNING
    assert info.round == round


def expect_code(send: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        send()
    err = caught.value
    got = err.code()  # type: ignore[attr-defined]
    assert got not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"{got}: {err.details()}"  # type: ignore[attr-defined]
    assert got == code, f"expected {code.name}, got {got.name}: {err.details()}"  # type: ignore[attr-defined]
    assert err.details(), "a refusal needs a message a person can act on"  # type: ignore[attr-defined]
    return err


def rejects(env: Env, code: grpc.StatusCode, send: Callable[[], object], *, counted: bool = True) -> grpc.RpcError:
    """``send`` fails with ``code``; the shared job's reference and round are untouched; the server is up."""
    job = env.job
    assert job.center is not None
    reference, round = job.center.clone(), job.round
    before = rejected(code.name.lower())
    err = expect_code(send, code)
    if counted:
        assert rejected(code.name.lower()) >= before + 1, f"parle_rejected_updates_total{{reason={code.name.lower()}}}"
    assert job.round == round, f"a rejected request moved the round from {round} to {job.round}"
    assert job.center is not None and torch.equal(job.center, reference), "a rejected request changed xbar"
    assert_alive(env, round)
    return err


def exchange_rejects(
    env: Env,
    code: grpc.StatusCode,
    headers: list[pb.TensorHeader],
    rest: list[Any],
    *,
    round: int | None = None,
    worker_id: str | None = None,
    job_id: str | None = None,
    counted: bool = True,
) -> grpc.RpcError:
    """An Exchange from the raw worker (current round unless told) with ``rest`` after the upload header."""

    def send() -> object:
        k = env.job.round if round is None else round
        first = upload(
            env.job_id if job_id is None else job_id, env.worker_id if worker_id is None else worker_id, k, headers
        )
        messages = [first, *(m if isinstance(m, pb.ExchangeChunk) else pb.ExchangeChunk(chunk=m) for m in rest)]
        return raw_exchange(env.coord, messages)

    return rejects(env, code, send, counted=counted)


def copy_header(header: pb.TensorHeader) -> pb.TensorHeader:
    out = pb.TensorHeader()
    out.CopyFrom(header)
    return out


def copy_chunk(chunk: pb.TensorChunk) -> pb.TensorChunk:
    out = pb.TensorChunk()
    out.CopyFrom(chunk)
    return out


# =====================================================================================================
# Exchange: explicit cases, one per category
# =====================================================================================================

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(60)
def test_wrong_element_count(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS - 1))
    exchange_rejects(env, INVALID, headers, chunks)
    headers, chunks = encode(torch.randn(N_PARAMS + 7))
    exchange_rejects(env, INVALID, headers, chunks)


@pytest.mark.timeout(60)
def test_wrong_shape_same_count(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS // 4, 4))
    exchange_rejects(env, INVALID, headers, chunks)


@pytest.mark.timeout(60)
def test_float64_instead_of_float32(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS, dtype=torch.float64))
    err = exchange_rejects(env, INVALID, headers, chunks)
    assert "float" in err.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_unknown_and_unspecified_dtype(env: Env) -> None:
    for dtype in (pb.DTYPE_UNSPECIFIED, 99):
        header = pb.TensorHeader(name="mu", dtype=dtype, shape=[N_PARAMS], total_bytes=FLAT_BYTES, num_chunks=1)  # type: ignore[arg-type]
        exchange_rejects(env, INVALID, [header], [pb.TensorChunk(data=bytes(FLAT_BYTES))])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values(env: Env, value: float) -> None:
    mu = torch.randn(N_PARAMS)
    mu[N_PARAMS // 2] = value
    headers, chunks = encode(mu)
    err = exchange_rejects(env, INVALID, headers, chunks)
    assert "NaN or Inf" in err.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_fp16_overflow_is_inf(env: Env) -> None:
    mu = torch.randn(N_PARAMS)
    mu[3] = 1e6  # beyond float16's 65504: travels as inf
    headers, chunks = encode(mu, compression=pb.COMPRESSION_FP16)
    exchange_rejects(env, INVALID, headers, chunks)


@pytest.mark.timeout(60)
def test_missing_chunk(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    assert len(chunks) >= 4
    exchange_rejects(env, INVALID, headers, chunks[:2] + chunks[3:])  # a gap
    exchange_rejects(env, INVALID, headers, chunks[:-1])  # short: the stream ends early
    exchange_rejects(env, INVALID, headers, [])  # no bytes at all


@pytest.mark.timeout(60)
def test_extra_chunk_inside_the_stream(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    exchange_rejects(env, INVALID, headers, [*chunks[:2], chunks[1], *chunks[2:]])  # a repeated chunk
    long = [*chunks[:-1], copy_chunk(chunks[-1])]
    long[-1].data += b"\x00\x00\x00\x00"  # one float more than the header declares
    exchange_rejects(env, INVALID, headers, long)


@pytest.mark.timeout(60)
def test_chunks_out_of_order(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    exchange_rejects(env, INVALID, headers, swapped)
    exchange_rejects(env, INVALID, headers, list(reversed(chunks)))


@pytest.mark.timeout(60)
def test_chunk_over_one_mib(env: Env) -> None:
    headers, _ = encode(torch.randn(N_PARAMS))
    big = pb.TensorChunk(tensor_index=0, chunk_index=0, data=bytes(MAX_CHUNK_BYTES + 1))
    err = exchange_rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, headers, [big])
    assert str(MAX_CHUNK_BYTES) in err.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_message_over_grpc_receive_limit(env: Env) -> None:
    """A 5 MiB chunk is refused by gRPC's 4 MiB receive limit itself (not counted by the handler)."""
    headers, _ = encode(torch.randn(N_PARAMS))
    huge = pb.TensorChunk(tensor_index=0, chunk_index=0, data=bytes(5 * MAX_CHUNK_BYTES))
    exchange_rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, headers, [huge], counted=False)


@pytest.mark.timeout(60)
def test_tensor_set_too_large(env: Env) -> None:
    elements = 3 << 30  # 12 GiB of float32: more than the coordinator accepts in one upload
    total = elements * 4
    header = pb.TensorHeader(
        name="mu",
        dtype=pb.DTYPE_FLOAT32,
        shape=[elements],
        total_bytes=total,
        num_chunks=math.ceil(total / MAX_CHUNK_BYTES),
    )
    exchange_rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, [header], [pb.TensorChunk(data=bytes(1024))])


@pytest.mark.timeout(60)
def test_total_bytes_inconsistent_with_shape(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    for total in (FLAT_BYTES - 4, FLAT_BYTES + 4, 0, N_PARAMS * 2):
        header = copy_header(headers[0])
        header.total_bytes = total
        err = exchange_rejects(env, INVALID, [header], chunks)
        assert "total_bytes" in err.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_num_chunks_inconsistent(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    for num in (0, len(chunks) - 1, len(chunks) + 1, FLAT_BYTES + 1):
        header = copy_header(headers[0])
        header.num_chunks = num
        exchange_rejects(env, INVALID, [header], chunks)


@pytest.mark.timeout(60)
def test_negative_dimension(env: Env) -> None:
    header = pb.TensorHeader(name="mu", dtype=pb.DTYPE_FLOAT32, shape=[-N_PARAMS], total_bytes=0, num_chunks=0)
    exchange_rejects(env, INVALID, [header], [])


@pytest.mark.timeout(60)
def test_sha256_mismatch_and_bad_length(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), sha256=True)
    flipped = copy_chunk(chunks[0])
    flipped.data = bytes([flipped.data[0] ^ 1]) + flipped.data[1:]
    exchange_rejects(env, INVALID, headers, [flipped, *chunks[1:]])
    header = copy_header(headers[0])
    header.sha256 = b"\x01" * 5
    exchange_rejects(env, INVALID, [header], chunks)


@pytest.mark.timeout(60)
def test_unknown_tensor_index(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    for index in (1, 7, 2**32 - 1):
        wrong = copy_chunk(chunks[0])
        wrong.tensor_index = index
        err = exchange_rejects(env, INVALID, headers, [wrong, *chunks[1:]])
        assert "tensor_index" in err.details()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_tensor_count_not_one(env: Env) -> None:
    exchange_rejects(env, INVALID, [], [])
    h2, c2 = encode_tensors([("a", torch.randn(N_PARAMS)), ("b", torch.randn(N_PARAMS))])
    exchange_rejects(env, INVALID, list(h2), list(c2))


@pytest.mark.timeout(60)
def test_stream_without_upload_header(env: Env) -> None:
    _, chunks = encode(torch.randn(N_PARAMS))
    down = pb.ExchangeChunk(download=pb.ExchangeDownload(closed_round=1))
    for messages in ([], as_messages(chunks), [down, *as_messages(chunks)], [pb.ExchangeChunk()]):
        rejects(env, INVALID, lambda messages=messages: raw_exchange(env.coord, messages))


@pytest.mark.timeout(60)
def test_non_chunk_message_inside_the_stream(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    again = upload(env.job_id, env.worker_id, 1, headers)
    for intruder in (again, pb.ExchangeChunk(), pb.ExchangeChunk(download=pb.ExchangeDownload())):
        exchange_rejects(env, INVALID, headers, [chunks[0], intruder, *chunks[1:]])


@pytest.mark.timeout(60)
def test_unknown_worker_id(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    for worker in ("w99", "nobody", "w0 "):
        exchange_rejects(env, grpc.StatusCode.NOT_FOUND, headers, chunks, worker_id=worker)
    exchange_rejects(env, INVALID, headers, chunks, worker_id="")  # never joined: "call Join first"


@pytest.mark.timeout(60)
def test_unknown_job_id(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    for job in ("no-such-job", "", env.job_id + "x"):
        exchange_rejects(env, grpc.StatusCode.NOT_FOUND, headers, chunks, job_id=job)


@pytest.mark.timeout(60)
def test_stale_and_future_rounds(env: Env) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    err = exchange_rejects(env, grpc.StatusCode.FAILED_PRECONDITION, headers, chunks, round=0)
    assert "stale" in err.details()  # type: ignore[attr-defined]
    err = exchange_rejects(env, grpc.StatusCode.FAILED_PRECONDITION, headers, chunks, round=99)
    assert "future" in err.details()  # type: ignore[attr-defined]
    exchange_rejects(env, grpc.StatusCode.FAILED_PRECONDITION, headers, chunks, round=2**64 - 1)


# =====================================================================================================
# Exchange: hypothesis
# =====================================================================================================


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(
    shape=st.one_of(
        st.integers(0, 2 * N_PARAMS).filter(lambda k: k != N_PARAMS).map(lambda k: (k,)),
        st.sampled_from([(), (0,), (1, N_PARAMS), (N_PARAMS, 1), (N_PARAMS // 4, 4), (2, 2, N_PARAMS // 4)]),
    ),
    chunk_bytes=st.integers(64 * 1024, MAX_CHUNK_BYTES),
)
def test_any_wrong_shape(env: Env, shape: tuple[int, ...], chunk_bytes: int) -> None:
    headers, chunks = encode(torch.zeros(shape), chunk_bytes=chunk_bytes)
    exchange_rejects(env, INVALID, headers, chunks)


# Every dtype the codec knows except the reference's float32.
KNOWN_DTYPES = {d: to_torch_dtype(d) for d in pb.DType.values() if d not in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32)}


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(dtype=st.one_of(st.sampled_from(sorted(KNOWN_DTYPES)), st.just(0), st.integers(9, 2**31 - 1)))
def test_any_wrong_dtype(env: Env, dtype: int) -> None:
    if dtype in KNOWN_DTYPES:
        headers, chunks = encode(torch.zeros(N_PARAMS, dtype=KNOWN_DTYPES[dtype]))  # type: ignore[index]
    else:
        headers = [pb.TensorHeader(name="mu", dtype=dtype, shape=[N_PARAMS], total_bytes=FLAT_BYTES, num_chunks=1)]  # type: ignore[arg-type]
        chunks = [pb.TensorChunk(data=bytes(FLAT_BYTES))]
    exchange_rejects(env, INVALID, headers, chunks)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(
    positions=st.lists(st.integers(0, N_PARAMS - 1), min_size=1, max_size=5),
    values=st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=5, max_size=5),
    compression=st.sampled_from([pb.COMPRESSION_NONE, pb.COMPRESSION_FP16, pb.COMPRESSION_BF16]),
    chunk_bytes=st.integers(64 * 1024, MAX_CHUNK_BYTES),
)
def test_any_non_finite(
    env: Env, positions: list[int], values: list[float], compression: int, chunk_bytes: int
) -> None:
    mu = torch.randn(N_PARAMS)
    for position, value in zip(positions, values, strict=False):
        mu[position] = value
    headers, chunks = encode(mu, chunk_bytes=chunk_bytes, compression=compression)
    exchange_rejects(env, INVALID, headers, chunks)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(magnitude=st.floats(65520.0, 3e38), sign=st.sampled_from([1.0, -1.0]), position=st.integers(0, N_PARAMS - 1))
def test_any_fp16_overflow(env: Env, magnitude: float, sign: float, position: int) -> None:
    mu = torch.randn(N_PARAMS)
    mu[position] = sign * magnitude
    headers, chunks = encode(mu, compression=pb.COMPRESSION_FP16)
    exchange_rejects(env, INVALID, headers, chunks)


MUTATIONS = [
    "drop",
    "swap",
    "duplicate",
    "tensor_index",
    "chunk_index",
    "truncate",
    "pad",
    "num_chunks",
    "total_bytes",
    "intruder",
    "flip_with_sha",
]


def mutate(
    data: st.DataObject, kind: str, headers: list[pb.TensorHeader], chunks: list[pb.TensorChunk]
) -> tuple[list[pb.TensorHeader], list[Any]]:
    """A broken version of a valid stream; none of these can be read as a valid tensor set."""
    header, out = copy_header(headers[0]), [copy_chunk(c) for c in chunks]
    n = len(out)
    i = data.draw(st.integers(0, n - 1), label="i")
    if kind == "drop":
        del out[i]
    elif kind == "swap":
        j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="j")
        out[i], out[j] = out[j], out[i]
    elif kind == "duplicate":
        # A copy of chunk i anywhere before the last chunk; a copy of the last chunk right after it completes
        # the tensor first and is trailing data, tested separately below.
        at = data.draw(st.integers(0, n - 1), label="at")
        out.insert(0 if i == at == n - 1 else at, copy_chunk(chunks[i]))
    elif kind == "tensor_index":
        out[i].tensor_index = data.draw(st.integers(1, 2**32 - 1), label="tensor_index")
    elif kind == "chunk_index":
        out[i].chunk_index = data.draw(st.integers(0, 2**32 - 1).filter(lambda c: c != i), label="chunk_index")
    elif kind == "truncate":
        cut = data.draw(st.integers(1, len(out[i].data)), label="cut")
        out[i].data = out[i].data[:-cut]
    elif kind == "pad":
        out[i].data += data.draw(st.binary(min_size=1, max_size=64), label="pad")
    elif kind == "num_chunks":
        header.num_chunks = data.draw(st.integers(0, 2**32 - 1).filter(lambda k: k != n), label="num_chunks")
    elif kind == "total_bytes":
        header.total_bytes = data.draw(st.integers(0, 2**64 - 1).filter(lambda b: b != FLAT_BYTES), label="total")
    elif kind == "intruder":
        intruder = data.draw(
            st.sampled_from(
                [
                    pb.ExchangeChunk(),
                    pb.ExchangeChunk(upload=pb.ExchangeUpload(round=1)),
                    pb.ExchangeChunk(download=pb.ExchangeDownload(closed_round=1)),
                ]
            ),
            label="intruder",
        )
        out.insert(i, intruder)  # before chunk i, so the server must still read it
    elif kind == "flip_with_sha":
        assert header.sha256, "encoded with sha256"
        byte = data.draw(st.integers(0, len(out[i].data) - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        raw = bytearray(out[i].data)
        raw[byte] ^= 1 << bit
        out[i].data = bytes(raw)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return [header], out


@pytest.mark.timeout(60)
@settings(HYPOTHESIS, max_examples=40)
@given(
    kind=st.sampled_from(MUTATIONS),
    chunk_bytes=st.sampled_from([16 * 1024, 64 * 1024, 100_000, 300_000, MAX_CHUNK_BYTES]),
    data=st.data(),
)
def test_any_broken_chunk_stream(env: Env, kind: str, chunk_bytes: int, data: st.DataObject) -> None:
    if kind in ("swap", "duplicate") and chunk_bytes == MAX_CHUNK_BYTES:
        chunk_bytes = 64 * 1024  # these need two chunks
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=chunk_bytes, sha256=kind == "flip_with_sha")
    broken_headers, broken = mutate(data, kind, headers, chunks)
    exchange_rejects(env, INVALID, broken_headers, broken)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(size=st.integers(MAX_CHUNK_BYTES + 1, 3 * MAX_CHUNK_BYTES), index=st.integers(0, 3))
def test_any_oversized_chunk(env: Env, size: int, index: int) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS), chunk_bytes=64 * 1024)
    big = pb.TensorChunk(tensor_index=0, chunk_index=index, data=bytes(size))
    exchange_rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, headers, [*chunks[:index], big])


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(data=st.data())
def test_any_stale_or_future_round(env: Env, data: st.DataObject) -> None:
    current = env.job.round
    k = data.draw(st.one_of(st.integers(0, current - 1), st.integers(current + 1, 2**64 - 1)), label="round")
    headers, chunks = encode(torch.randn(N_PARAMS))
    exchange_rejects(env, grpc.StatusCode.FAILED_PRECONDITION, headers, chunks, round=k)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(worker=st.text(min_size=1, max_size=24).filter(lambda w: w not in ("w0", "w1")))
def test_any_unknown_worker(env: Env, worker: str) -> None:
    headers, chunks = encode(torch.randn(N_PARAMS))
    exchange_rejects(env, grpc.StatusCode.NOT_FOUND, headers, chunks, worker_id=worker)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(job=st.text(max_size=40))
def test_any_unknown_job(env: Env, job: str) -> None:
    if job == env.job_id:
        job += "-"
    headers, chunks = encode(torch.randn(N_PARAMS))
    exchange_rejects(env, grpc.StatusCode.NOT_FOUND, headers, chunks, job_id=job)


# =====================================================================================================
# Exchange: trailing data after a complete tensor (fresh job each: a wrongly accepted one closes a round)
# =====================================================================================================


@pytest.mark.timeout(60)
@pytest.mark.parametrize("trailer", ["next_chunk", "other_tensor", "second_upload"])
def test_trailing_data_after_complete_tensor(env: Env, trailer: str) -> None:
    """A stream with more messages than its header announces is malformed even if the announced part is
    complete: the server must answer INVALID_ARGUMENT and must not use the upload."""
    fresh = fresh_job(env, f"trail-{trailer.replace('_', '-')}")
    assert fresh.job.center is not None
    reference, round = fresh.job.center.clone(), fresh.job.round
    headers, chunks = encode(torch.randn(N_PARAMS))
    extra = {
        "next_chunk": pb.ExchangeChunk(chunk=pb.TensorChunk(tensor_index=0, chunk_index=len(chunks), data=b"\0" * 4)),
        "other_tensor": pb.ExchangeChunk(chunk=pb.TensorChunk(tensor_index=1, chunk_index=0, data=b"\0" * 4)),
        "second_upload": upload(fresh.job_id, fresh.worker_id, round, headers),
    }[trailer]
    messages = [upload(fresh.job_id, fresh.worker_id, round, headers), *as_messages(chunks), extra]
    before = rejected("invalid_argument")
    outcome = "accepted"
    try:
        raw_exchange(env.coord, messages)
    except grpc.RpcError as err:
        outcome = err.code().name  # type: ignore[attr-defined]
    assert outcome == "INVALID_ARGUMENT" and fresh.job.round == round and torch.equal(fresh.job.center, reference), (
        f"Exchange with a trailing {trailer} after the announced chunks: got {outcome}, round {round} -> "
        f"{fresh.job.round}, reference changed: {not torch.equal(fresh.job.center, reference)}"
    )
    assert rejected("invalid_argument") >= before + 1


# =====================================================================================================
# Join, Heartbeat, Leave, Report
# =====================================================================================================


@pytest.mark.timeout(60)
def test_join_malformed(env: Env) -> None:
    def join(request: pb.JoinRequest) -> Callable[[], object]:
        return lambda: list(env.coord.Join(request, timeout=CALL_TIMEOUT))

    rejects(env, INVALID, join(pb.JoinRequest(worker_name="  ", job_id=env.job_id)))
    rejects(env, grpc.StatusCode.NOT_FOUND, join(pb.JoinRequest(worker_name="x", job_id="no-such-job")))
    # Both replicas of the shared job are taken.
    rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, join(pb.JoinRequest(worker_name="x", job_id=env.job_id)))
    assert env.job.live_workers == 2


@pytest.mark.timeout(60)
def test_heartbeat_malformed(env: Env) -> None:
    def beat(worker: str, job: str) -> Callable[[], object]:
        return lambda: env.coord.Heartbeat(pb.HeartbeatRequest(worker_id=worker, job_id=job), timeout=CALL_TIMEOUT)

    rejects(env, grpc.StatusCode.NOT_FOUND, beat("w99", env.job_id))
    rejects(env, grpc.StatusCode.NOT_FOUND, beat(env.worker_id, "no-such-job"))
    rejects(env, INVALID, beat("", env.job_id))


@pytest.mark.timeout(60)
def test_leave_unknown_job_and_empty_worker(env: Env) -> None:
    def leave(worker: str, job: str) -> Callable[[], object]:
        return lambda: env.coord.Leave(pb.LeaveRequest(worker_id=worker, job_id=job), timeout=CALL_TIMEOUT)

    rejects(env, grpc.StatusCode.NOT_FOUND, leave(env.worker_id, "no-such-job"))
    rejects(env, INVALID, leave("", env.job_id))
    assert env.job.live_workers == 2


@pytest.mark.timeout(60)
def test_leave_failed_by_unknown_worker_does_not_fail_the_job(env: Env) -> None:
    """A Leave(failed=True) naming a worker id that is not a member must be refused (NOT_FOUND) or at
    least answered with was_member=False; it must never fail someone else's job."""
    fresh = fresh_job(env, "leave-unknown")
    outcome, was_member = "OK", None
    try:
        reply = env.coord.Leave(
            pb.LeaveRequest(worker_id="intruder", job_id=fresh.job_id, failed=True, reason="boom"), timeout=CALL_TIMEOUT
        )
        was_member = reply.was_member
    except grpc.RpcError as err:
        outcome = err.code().name  # type: ignore[attr-defined]
    state = fresh.job.state
    assert outcome in ("OK", "NOT_FOUND"), outcome
    assert state is JobState.RUNNING and was_member is not True, (
        f"Leave(worker_id='intruder', failed=True) from a non-member: status {outcome}, was_member={was_member}, "
        f"job state is now {state.value}"
    )


def report(env: Env, messages: list[pb.ReportChunk]) -> Callable[[], object]:
    return lambda: env.coord.Report(iter(messages), timeout=CALL_TIMEOUT)


def report_header(env: Env, **fields: Any) -> pb.ReportChunk:
    base: dict[str, Any] = {"worker_id": env.worker_id, "job_id": env.job_id, "round": env.job.round}
    return pb.ReportChunk(header=pb.ReportHeader(**{**base, **fields}))


@pytest.mark.timeout(60)
def test_report_malformed(env: Env) -> None:
    state = torch.randn(100)
    state[5] = math.nan
    headers, chunks = encode_tensors([("weights", state)])
    nan_state = [
        report_header(env, state_kind=pb.STATE_KIND_REPLICA, tensors=headers),
        *(pb.ReportChunk(chunk=c) for c in chunks),
    ]
    rejects(env, INVALID, report(env, nan_state))
    rejects(env, INVALID, report(env, []))
    rejects(env, INVALID, report(env, [pb.ReportChunk(chunk=pb.TensorChunk(data=b"1234"))]))
    bad_split = pb.EvalResult(round=0, split=pb.SPLIT_UNSPECIFIED, loss=1.0, error=0.5)
    rejects(env, INVALID, report(env, [report_header(env, evals=[bad_split])]))
    # A short tensor stream.
    headers, chunks = encode_tensors([("weights", torch.randn(100))], chunk_bytes=100)
    short = [
        report_header(env, state_kind=pb.STATE_KIND_REPLICA, tensors=headers),
        *(pb.ReportChunk(chunk=c) for c in list(chunks)[:-1]),
    ]
    rejects(env, INVALID, report(env, short))
    # A replica state without the weights x.
    headers, chunks = encode_tensors([("weights", torch.randn(100))])
    no_x = [
        report_header(env, state_kind=pb.STATE_KIND_REPLICA, tensors=headers),
        *(pb.ReportChunk(chunk=c) for c in chunks),
    ]
    rejects(env, INVALID, report(env, no_x))
    # Valid weights when no model is being gathered.
    headers, chunks = encode_tensors([("x", torch.randn(N_PARAMS))])
    state_now = [
        report_header(env, state_kind=pb.STATE_KIND_REPLICA, tensors=headers),
        *(pb.ReportChunk(chunk=c) for c in chunks),
    ]
    rejects(env, grpc.StatusCode.FAILED_PRECONDITION, report(env, state_now))
    # Too large: announced bytes beyond the limit.
    total = 9 << 30
    big = pb.TensorHeader(
        name="x", dtype=pb.DTYPE_UINT8, shape=[total], total_bytes=total, num_chunks=math.ceil(total / MAX_CHUNK_BYTES)
    )
    rejects(env, grpc.StatusCode.RESOURCE_EXHAUSTED, report(env, [report_header(env, tensors=[big])]))


@pytest.mark.timeout(60)
def test_report_unknown_job_or_worker(env: Env) -> None:
    test_eval = pb.EvalResult(round=0, split=pb.SPLIT_TEST, loss=1.0, error=0.5)
    rejects(env, grpc.StatusCode.NOT_FOUND, report(env, [report_header(env, job_id="no-such-job")]))
    rejects(env, grpc.StatusCode.NOT_FOUND, report(env, [report_header(env, worker_id="w99", evals=[test_eval])]))
    assert env.job.last_test_error is None, "an eval from a non-member must not be recorded"


@pytest.mark.timeout(60)
def test_report_from_unknown_worker_without_payload(env: Env) -> None:
    """An empty Report from a worker id that is not a member is still from an unknown worker."""
    rejects(env, grpc.StatusCode.NOT_FOUND, report(env, [report_header(env, worker_id="w99")]))


# =====================================================================================================
# Jobs
# =====================================================================================================


def job_count(env: Env) -> int:
    return len(env.jobs.List(pb.ListRequest(), timeout=CALL_TIMEOUT).jobs)


def submit(env: Env, text: str) -> Callable[[], object]:
    return lambda: env.jobs.Submit(pb.SubmitRequest(spec_yaml=text), timeout=CALL_TIMEOUT)


def submit_rejected(env: Env, text: str) -> None:
    count = job_count(env)
    err = rejects(env, INVALID, submit(env, text))
    assert "config error" in err.details() or "YAML" in err.details()  # type: ignore[attr-defined]
    assert job_count(env) == count, "a rejected Submit must not register a job"


VALID_YAML = yaml.safe_dump(job_spec(replicas=2, name="ok"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text",
    [
        "name: [unclosed\n",
        ": : :\n  - ]\n",
        "\t- not yaml: {",
        VALID_YAML + "bogus_key: 1\n",
        VALID_YAML.replace("L: 2", "L: -1"),
        VALID_YAML.replace("L: 2", "L: two"),
        VALID_YAML.replace("replicas: 2", "replicas: 0"),
        VALID_YAML.replace("preset: parle", "preset: adam"),
        "",
        "- a list\n- not a mapping\n",
        "just a string",
        "optim: {L: 2, momentum: 1.5}\ndata: {name: synthetic}\n",
        "data: {name: mnist}\n",  # needs a root
        "preset: []\n",
        "preset: {a: 1}\n",
        "epochs: .nan\ndata: {name: synthetic}\n",
    ],
    ids=lambda t: t[:24],
)
def test_submit_bad_spec(env: Env, text: str) -> None:
    submit_rejected(env, text)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[CoordinatorServer, pb_grpc.JobsStub]]:
    """A server of its own, for specs that (wrongly) leave lasting damage behind."""
    with CoordinatorServer(tmp_path / "state") as server, grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.JobsStub(channel)


def outcome_of(send: Callable[[], object]) -> str:
    try:
        send()
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
    except Exception as err:  # e.g. a coordinator that cannot start
        return f"{type(err).__name__}: {err}"
    return "OK"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("epochs", [".inf", "1.0e+308"])
def test_submit_overflowing_epochs(own_server: tuple[CoordinatorServer, pb_grpc.JobsStub], epochs: str) -> None:
    """An epoch budget whose round count overflows is a spec error: INVALID_ARGUMENT, nothing registered,
    and the state directory still opens (the coordinator reloads every non-terminal job at start)."""
    server, jobs = own_server
    text = f"name: overflow\nepochs: {epochs}\ndata: {{name: synthetic}}\n"
    submitted = outcome_of(lambda: jobs.Submit(pb.SubmitRequest(spec_yaml=text), timeout=CALL_TIMEOUT))
    listed = [j.name for j in jobs.List(pb.ListRequest(), timeout=CALL_TIMEOUT).jobs]
    server.close()
    restarted = outcome_of(lambda: CoordinatorServer(server.manager.state_dir).close())
    assert submitted.startswith("INVALID_ARGUMENT") and listed == [] and restarted == "OK", (
        f"Submit epochs={epochs}: {submitted}; jobs registered afterwards: {listed}; "
        f"restarting a coordinator on the state directory: {restarted}"
    )


@pytest.mark.timeout(60)
def test_submit_replicas_beyond_the_wire_type(own_server: tuple[CoordinatorServer, pb_grpc.JobsStub]) -> None:
    """JobInfo.replicas is uint32: a spec the server cannot describe must be refused at Submit, or it poisons
    Get and List for every job."""
    _, jobs = own_server
    text = "name: many\nreplicas: 5000000000\ndata: {name: synthetic}\n"
    submitted = outcome_of(lambda: jobs.Submit(pb.SubmitRequest(spec_yaml=text), timeout=CALL_TIMEOUT))
    listed = outcome_of(lambda: jobs.List(pb.ListRequest(), timeout=CALL_TIMEOUT))
    assert submitted.startswith("INVALID_ARGUMENT") and listed == "OK", (
        f"Submit replicas=5000000000 answered {submitted}; List afterwards answered {listed}"
    )


SPEC_KEYS = [
    "name",
    "replicas",
    "epochs",
    "max_rounds",
    "seed",
    "device",
    "model",
    "data",
    "optim",
    "eval",
    "checkpoint",
    "runtime",
    "bogus",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(-1e6, 1e6),
    st.just(math.nan),
    st.text(alphabet="abcdefxyz0123456789-_", max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "L", "lr", "batch_size", "mode", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(
    raw=st.dictionaries(st.sampled_from(SPEC_KEYS), VALUES, max_size=5),
    preset=st.one_of(st.none(), st.sampled_from(["sgd", "entropy-sgd", "elastic-sgd", "parle", "easgd", "adam", ""])),
)
def test_any_submit_is_accepted_or_invalid(env: Env, raw: dict[str, Any], preset: str | None) -> None:
    """Structurally random specs (unhashable presets are an explicit case above)."""
    raw.setdefault("data", {"name": "synthetic"})
    if preset is not None:
        raw["preset"] = preset
    count = job_count(env)
    try:
        reply = env.jobs.Submit(pb.SubmitRequest(spec_yaml=yaml.safe_dump(raw)), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        assert err.code() == INVALID, f"{raw}: {err.code()} {err.details()}"  # type: ignore[attr-defined]
        assert job_count(env) == count
    else:
        info = env.jobs.Get(pb.GetRequest(job_id=reply.job_id), timeout=CALL_TIMEOUT)
        assert info.id == reply.job_id
        env.jobs.Cancel(pb.CancelRequest(job_id=reply.job_id), timeout=CALL_TIMEOUT)
    assert_alive(env, env.job.round)


@pytest.mark.timeout(60)
@HYPOTHESIS
@given(job=st.text(max_size=40))
def test_unknown_job_ids_are_not_found(env: Env, job: str) -> None:
    if job == env.job_id:
        job += "-"
    rejects(env, grpc.StatusCode.NOT_FOUND, lambda: env.jobs.Get(pb.GetRequest(job_id=job), timeout=CALL_TIMEOUT))
    rejects(env, grpc.StatusCode.NOT_FOUND, lambda: env.jobs.Cancel(pb.CancelRequest(job_id=job), timeout=CALL_TIMEOUT))
    rejects(
        env,
        grpc.StatusCode.NOT_FOUND,
        lambda: list(env.jobs.Download(pb.DownloadRequest(job_id=job), timeout=CALL_TIMEOUT)),
    )
    rejects(
        env, grpc.StatusCode.NOT_FOUND, lambda: list(env.jobs.Watch(pb.WatchRequest(job_id=job), timeout=CALL_TIMEOUT))
    )


@pytest.mark.timeout(60)
def test_download_before_any_checkpoint(env: Env) -> None:
    def download() -> object:
        return list(env.jobs.Download(pb.DownloadRequest(job_id=env.job_id), timeout=CALL_TIMEOUT))

    rejects(env, grpc.StatusCode.FAILED_PRECONDITION, download)


# =====================================================================================================
# After all that: a valid round still closes, on exactly the two valid uploads
# =====================================================================================================


@pytest.mark.timeout(60)
def test_valid_round_after_rejections(env: Env) -> None:
    job = env.job
    k = job.round
    a, b = torch.randn(N_PARAMS), torch.randn(N_PARAMS)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(reply=env.transport.exchange(k, a, STATS)))
    thread.start()
    down = valid_exchange(env.coord, env.job_id, env.worker_id, k, b)
    thread.join(timeout=30)
    assert down.closed_round == k and result["reply"].closed_round == k
    assert job.round == k + 1
    expected = ((a.double() + b.double()) / 2).float()
    assert job.center is not None and torch.equal(job.center, expected), "rejected uploads leaked into xbar"
    assert torch.equal(result["reply"].reference, expected)
    assert_alive(env, k + 1)
