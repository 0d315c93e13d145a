"""Throughput of one exchange round trip through the gRPC transport vs raw TCP (and raw gRPC) on loopback.

For each size, a job with one replica whose "model" is a flat float32 tensor of that many MiB: a real
``GrpcTransport`` joins a real ``CoordinatorServer`` on 127.0.0.1:0 and times ``exchange()`` (upload of
the coupled average + download of the new reference = 2x the bytes). The baselines, in the same run:

- TCP: a plain socket echo (a server thread receives N bytes and sends N bytes back; the client uses
  ``sendall`` and ``recv_into`` with preallocated buffers);
- raw gRPC: a bytes echo on a bare gRPC stream-stream method, 1 MiB messages, identity serializers:
  what gRPC's Python stack costs by itself, without protobuf, the codec or the coordinator.

All three are interleaved call by call, so drift in machine load hits them alike; figures are medians.
Target (issue): exchange >= 0.6x TCP for 8 MiB and up. The exchange is timed twice: over the coordinator's
data channel (the default path) and over gRPC Exchange streams (the fallback, ``data_channel=False``).

    python -m bench.exchange_throughput [--sizes-mb 1 8 100] [--repeats N] [--fp16-mb 100] [--breakdown]
                                        [--coordinator inprocess|subprocess] [--json]

``--json`` prints one JSON object per size and wire format instead of the table, with the ratios to TCP
of the same run (``exchange_over_tcp``, ``streams_over_tcp``, ``raw_grpc_over_tcp``).

By default the coordinator runs in this process, as asked by the issue, so it shares the GIL with the
client; ``--coordinator subprocess`` runs ``python -m cluster.cli coordinator`` instead. ``--breakdown``
also times the CPU work of one exchange that is not the network, in this process: encoding, decoding
(with the finite check) and the coordinator's ``Job.report`` (validation + the float64 running mean +
the round event), per size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.common import STATS, tensor_job
from bench.scale import coordinator
from cluster.client import Endpoint, JobsClient
from coordinator.job import Job
from coordinator.server import CoordinatorServer
from protos import parle_pb2 as pb
from protos.codec import MAX_CHUNK_BYTES, decode_tensors, encode_tensors
from protos.spec import JobSpec, resolve
from worker.transports.grpc import GrpcTransport, open_channel

MiB = 1 << 20


def job_spec(name: str, compression: str = "none") -> JobSpec:
    return resolve(tensor_job(name, 1, compression=compression))


# ----- raw TCP baseline ------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


class TcpEcho(contextlib.AbstractContextManager["TcpEcho"]):
    """A loopback echo: each request is an 8-byte length then that many bytes, answered with as many."""

    def __init__(self, max_bytes: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._server_buf = bytearray(max_bytes)
        self._thread = threading.Thread(target=self._serve, name="tcp-echo", daemon=True)
        self._thread.start()
        self.client = socket.create_connection(self._listener.getsockname())
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head, view = bytearray(8), memoryview(self._server_buf)
        with conn, contextlib.suppress(ConnectionError):
            while True:
                _recv_exactly(conn, memoryview(head))
                (n,) = struct.unpack("<Q", head)
                _recv_exactly(conn, view[:n])
                conn.sendall(view[:n])

    def round_trip(self, payload: memoryview, into: memoryview) -> None:
        self.client.sendall(struct.pack("<Q", len(payload)))
        self.client.sendall(payload)
        _recv_exactly(self.client, into)

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self._listener.close()
        self._thread.join(timeout=5)


# ----- raw gRPC baseline (bytes in, bytes out: no protobuf, codec or coordinator) ----------------


class GrpcEcho(contextlib.AbstractContextManager["GrpcEcho"]):
    """A bytes echo on a plain gRPC stream-stream method with identity serializers, chunked like the
    codec (``MAX_CHUNK_BYTES``): what gRPC itself costs, without anything of this project."""

    def __init__(self) -> None:
        def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from list(requests)  # receive everything, then send it back, like the coordinator

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._channel = open_channel(f"127.0.0.1:{port}")
        self._call = self._channel.stream_stream("/bench.Echo/Echo")

    def round_trip(self, chunks: list[bytes], into: memoryview) -> None:
        offset = 0
        for reply in self._call(iter(chunks)):
            into[offset : offset + len(reply)] = reply
            offset += len(reply)

    def __exit__(self, *exc: object) -> None:
        self._channel.close()
        self._server.stop(None).wait()


# ----- gRPC ------------------------------------------------------------------------------------


@dataclass
class Target:
    """A running coordinator: where it listens, and how to submit and cancel jobs on it."""

    address: str
    submit: Callable[[JobSpec], str]
    cancel: Callable[[str], object]


@contextlib.contextmanager
def coordinator_target(where: str, state_dir: Path) -> Iterator[Target]:
    """``inprocess``: a ``CoordinatorServer`` in this process (it shares the GIL with the client);
    ``subprocess``: ``python -m cluster.cli coordinator`` (jobs submitted with the jobs client)."""
    if where == "inprocess":
        with CoordinatorServer(state_dir) as server:
            yield Target(server.address, server.manager.submit, server.manager.cancel)
        return
    with coordinator(state_dir, {}) as coord, JobsClient(Endpoint(coord.address)) as client:
        yield Target(coord.address, lambda spec: client.submit(spec.to_yaml()), client.cancel)


@contextlib.contextmanager
def grpc_exchanger(
    target: Target, size: int, compression: str, data_channel: bool = True
) -> Iterator[Callable[[], None]]:
    """A joined transport on its own job; yields a function doing one exchange of a ``size``-byte tensor
    (over the coordinator's data channel, or with ``data_channel=False`` over gRPC Exchange streams)."""
    path = "data" if data_channel else "streams"
    job_id = target.submit(job_spec(f"xput-{size // MiB}mib-{compression}-{path}", compression))
    transport = GrpcTransport(target.address, job_id=job_id, timeout_s=600.0, data_channel=data_channel)
    try:
        grant = transport.join("bench", "cpu")
        if data_channel and transport.data is None:
            raise RuntimeError("the data channel did not connect; see the warning above")
        mu = torch.randn(size // 4)
        state = {"round": grant.values.round}

        def exchange() -> None:
            reply = transport.exchange(state["round"], mu, STATS)
            state["round"] = reply.next_values.round

        yield exchange
    finally:
        transport.close()
        target.cancel(job_id)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(target: Target, grpc_echo: GrpcEcho, size: int, repeats: int, compression: str) -> dict[str, float]:
    """Median seconds of one exchange (data channel, and over gRPC streams: the fallback), one raw gRPC echo
    and one TCP round trip of ``size`` bytes, interleaved call by call; MiB/s counts both directions (2x the
    float32 tensor)."""
    raw = torch.randn(size // 4).numpy().tobytes()
    payload = memoryview(bytearray(raw))
    chunks = [raw[i : i + MAX_CHUNK_BYTES] for i in range(0, size, MAX_CHUNK_BYTES)]
    into = memoryview(bytearray(size))
    with (
        TcpEcho(size) as tcp_echo,
        grpc_exchanger(target, size, compression) as exchange,
        grpc_exchanger(target, size, compression, data_channel=False) as exchange_streams,
    ):
        contenders: dict[str, Callable[[], None]] = {
            "exchange": exchange,
            "streams": exchange_streams,
            "grpc": lambda: grpc_echo.round_trip(chunks, into),
            "tcp": lambda: tcp_echo.round_trip(payload, into),
        }
        for fn in contenders.values():  # warm-up: the coordinator learns the shape, buffers settle
            fn()
            fn()
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                seconds[name].append(timed(fn))
    out = {f"{name}_s": statistics.median(s) for name, s in seconds.items()}
    out.update({f"{name}_mbs": 2 * size / MiB / out[f"{name}_s"] for name in contenders})
    return out


# ----- where the time goes (no network) ----------------------------------------------------------


def breakdown(size: int, repeats: int, state_dir: Path) -> dict[str, float]:
    """Median seconds of the CPU work one exchange does besides moving bytes: encode (chunk copies),
    decode (assembly + finite check, as the server does it) and ``Job.report`` for one replica, not donated:
    the report is copied into the float64 sum and the mean divided out of it, the work a round's later reports
    cost (a donated first report that stays alone is kept as the mean, at almost no cost)."""
    mu = torch.randn(size // 4)

    def encode() -> list[pb.TensorChunk]:
        encoded = encode_tensors([("mu", mu)])
        return list(encoded.chunks)

    encoded = encode_tensors([("mu", mu)])
    headers, chunks = encoded.headers, list(encoded.chunks)
    job = Job("breakdown", job_spec("breakdown"), state_dir / "breakdown")
    grant = job.join("bench", "cpu")
    state = {"round": grant.values.round}

    def report() -> None:
        job.report(grant.worker_id, state["round"], mu, STATS)
        state["round"] += 1

    parts: dict[str, Callable[[], Any]] = {
        "encode": encode,
        "decode": lambda: decode_tensors(headers, chunks, require_finite=True),
        "report": report,
    }
    out = {}
    for name, fn in parts.items():
        fn()
        out[name] = statistics.median(timed(fn) for _ in range(repeats))
    job.log.close()
    return out


# ----- main ------------------------------------------------------------------------------------


def auto_repeats(size_mb: float) -> int:
    return int(max(5, min(40, 200 // max(size_mb, 1))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", nargs="+", type=float, default=[1, 8, 100], help="tensor sizes in MiB")
    parser.add_argument("--repeats", type=int, help="timed round trips per size (default: 40 to 5 by size)")
    parser.add_argument("--fp16-mb", nargs="*", type=float, default=[100], help="sizes also run with fp16 (MiB)")
    parser.add_argument("--breakdown", action="store_true", help="also time encode / decode / Job.report")
    parser.add_argument(
        "--coordinator", choices=["inprocess", "subprocess"], default="inprocess",
        help="where the coordinator runs (the echo baselines always run in this process)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="one JSON object per size (size_mib, wire, exchange_over_tcp, streams_over_tcp, raw_grpc_over_tcp, ...)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if not args.json:
        print(
            f"coordinator {args.coordinator}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            "MiB = 2^20 bytes; throughput counts upload + download (2x the tensor), median over the repeats;\n"
            "exchange: over the data channel (the default); streams: over gRPC Exchange streams (the fallback)"
        )
        print(
            f"{'size MiB':>9}{'wire':>6}{'reps':>6}{'exchange ms':>13}{'exchange MiB/s':>16}{'streams MiB/s':>15}"
            f"{'raw gRPC MiB/s':>16}{'TCP MiB/s':>11}{'exch/TCP':>10}{'streams/TCP':>13}{'raw gRPC/TCP':>14}"
        )
    runs = [(mb, "none") for mb in args.sizes_mb] + [(mb, "fp16") for mb in args.fp16_mb]
    with (
        tempfile.TemporaryDirectory(prefix="bench-xput-") as tmp,
        coordinator_target(args.coordinator, Path(tmp) / "coordinator") as target,
        GrpcEcho() as grpc_echo,
    ):
        for mb, compression in runs:
            size = int(mb * MiB) // 4 * 4
            repeats = args.repeats or auto_repeats(mb)
            r = measure(target, grpc_echo, size, repeats, compression)
            wire = "fp32" if compression == "none" else compression
            # With fp16 the wire carries half the bytes; MiB/s still counts the float32 tensor's bytes.
            ratios = {name: r[f"{name}_mbs"] / r["tcp_mbs"] for name in ("exchange", "streams", "grpc")}
            if args.json:
                record = {
                    "size_mib": mb,
                    "wire": wire,
                    "repeats": repeats,
                    "exchange_over_tcp": round(ratios["exchange"], 3),
                    "streams_over_tcp": round(ratios["streams"], 3),
                    "raw_grpc_over_tcp": round(ratios["grpc"], 3),
                    **{f"{name}_ms": round(1e3 * r[f"{name}_s"], 2) for name in ("exchange", "streams", "grpc", "tcp")},
                    **{f"{name}_mib_s": round(r[f"{name}_mbs"]) for name in ("exchange", "streams", "grpc", "tcp")},
                    "coordinator": args.coordinator,
                }
                print(json.dumps(record), flush=True)
                continue
            print(
                f"{mb:>9g}{wire:>6}{repeats:>6}{1e3 * r['exchange_s']:>13.1f}{r['exchange_mbs']:>16.0f}"
                f"{r['streams_mbs']:>15.0f}{r['grpc_mbs']:>16.0f}{r['tcp_mbs']:>11.0f}{ratios['exchange']:>9.2f}x"
                f"{ratios['streams']:>12.2f}x{ratios['grpc']:>13.2f}x",
                flush=True,
            )
        if args.breakdown:
            print("\nCPU work per exchange besides the network (this process, median ms):")
            print(f"{'size MiB':>9}{'encode':>9}{'decode+finite':>15}{'Job.report':>12}")
            for mb in args.sizes_mb:
                size = int(mb * MiB) // 4 * 4
                b = breakdown(size, args.repeats or auto_repeats(mb), Path(tmp))
                print(f"{mb:>9g}{1e3 * b['encode']:>9.1f}{1e3 * b['decode']:>15.1f}{1e3 * b['report']:>12.1f}")


if __name__ == "__main__":
    main()
