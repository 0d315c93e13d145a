"""Many light workers against one coordinator: rounds per second and the coordinator's peak memory.

N simulated workers (threads in this process, each with its own ``GrpcTransport``, no model) serve one
sync job on a coordinator started as a subprocess (``python -m cluster.cli coordinator``), so that its
memory can be read from ``/proc/PID/status`` (VmRSS now, VmHWM = peak). Each round a worker sleeps a
short "chain" and exchanges a random float32 tensor of P elements. A fresh coordinator is started for
every (P, N), so each peak belongs to one configuration.

    python -m bench.scale [--workers 8 64] [--params 1000000 4000000] [--rounds 3] [--chain-ms 5] [--streams]

Workers exchange over the coordinator's data channel (``--streams``: over gRPC Exchange streams, the
fallback). "TCP bound" is what a round's bytes (every upload and every download) take through one loopback
TCP link, measured in the same run, plus the simulated chain.

The point: the coordinator decodes at most a few uploads at once and adds each into a running sum, so
its peak memory should grow with the model size P, not with N x P. The last lines print the ratio
peak(N_max) / peak(N_min) and the increment per extra worker, in MB and in model sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench.common import tensor_job
from cluster.client import Endpoint, JobsClient
from cluster.processes import reap
from protos.messages import RoundStats
from worker.transports.grpc import GrpcTransport

MB = 1e6
DISTINCT_TENSORS = 4  # workers share a few random tensors: the client's memory is not what is measured


@dataclass
class Coordinator:
    proc: subprocess.Popen[str]
    address: str

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak resident set) of the coordinator process, in MB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / MB
        return out


@contextlib.contextmanager
def coordinator(
    state_dir: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] = (), log: Path | None = None
) -> Iterator[Coordinator]:
    """``parle coordinator`` on a free loopback port (``extra``: more flags; ``log``: where its stderr goes)."""
    cmd = [sys.executable, "-m", "cluster.cli", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("w")) if log is not None else None
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})}
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "parle coordinator listening on HOST:PORT"
            if "listening on" not in line:
                raise RuntimeError(f"coordinator did not start: {line!r}" + (f" (log: {log})" if log else ""))
            yield Coordinator(proc, line.rsplit(" ", 1)[1].strip())
        finally:
            reap([proc], grace_s=30)


def job_yaml(workers: int) -> str:
    """A sync job that never finishes on its own (it is cancelled), evaluates and checkpoints never."""
    spec = tensor_job(f"scale-{workers}", workers, lease_s=600.0, start_timeout_s=120.0)
    return yaml.safe_dump(spec)


def run_workers(
    address: str, job_id: str, n: int, mus: list[torch.Tensor], rounds: int, chain_s: float, data_channel: bool = True
) -> list[float]:
    """Run ``rounds`` rounds with ``n`` worker threads; returns when each round ended (its last reply)."""
    ends = [[0.0] * rounds for _ in range(n)]
    errors: list[BaseException] = []
    stats = RoundStats(train_loss=0.0, inner_steps=1, samples=1, chain_seconds=chain_s, train_size=60000)

    def worker(i: int) -> None:
        try:
            with GrpcTransport(address, job_id=job_id, timeout_s=300.0, data_channel=data_channel) as transport:
                values = transport.join(f"sim-{i}", "cpu", i).values
                if data_channel and transport.data is None:
                    raise RuntimeError("the data channel did not connect")
                for r in range(rounds):
                    time.sleep(chain_s)
                    reply = transport.exchange(values.round, mus[i % len(mus)], stats)
                    ends[i][r] = time.monotonic()
                    values = reply.next_values
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,), name=f"sim-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} workers failed; first: {errors[0]!r}")
    return [max(ends[i][r] for i in range(n)) for r in range(rounds)]


def tcp_bound_s(params: int, n: int, repeats: int = 5) -> float:
    """What one TCP link on loopback needs to move a round's bytes: n uploads and n downloads of ``params``
    float32, from the median of ``repeats`` echoes of one model (the baseline of bench.exchange_throughput)."""
    from bench.exchange_throughput import TcpEcho  # it imports this module

    size = 4 * params
    payload, into = memoryview(bytearray(size)), memoryview(bytearray(size))
    with TcpEcho(size) as echo:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            echo.round_trip(payload, into)
            times.append(time.perf_counter() - start)
    return n * statistics.median(times)


def measure(
    params: int,
    n: int,
    rounds: int,
    warmup: int,
    chain_s: float,
    root: Path,
    env: dict[str, str],
    data_channel: bool = True,
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    mus = [torch.randn(params, generator=gen) for _ in range(min(n, DISTINCT_TENSORS))]
    with coordinator(root / f"p{params}-n{n}", env) as coord:
        idle = coord.memory_mb()["VmRSS"]
        with JobsClient(Endpoint(coord.address)) as client:
            job_id = client.submit(job_yaml(n))
            ends = run_workers(coord.address, job_id, n, mus, warmup + rounds, chain_s, data_channel)
            memory = coord.memory_mb()
            client.cancel(job_id)
    gaps = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:], strict=False)]
    return {
        "rounds_per_s": rounds / (ends[-1] - ends[warmup - 1]),
        "median_round_s": statistics.median(gaps),
        "idle_mb": idle,
        "rss_mb": memory["VmRSS"],
        "peak_mb": memory["VmHWM"],
        "model_mb": params * 4 / MB,
        "tcp_bound_s": tcp_bound_s(params, n) + chain_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--params", nargs="+", type=int, default=[1_000_000, 4_000_000], help="float32 elements")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after --warmup rounds)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chain-ms", type=float, default=5.0, help="simulated chain time per round")
    parser.add_argument(
        "--coordinator-env", nargs="*", default=[], metavar="KEY=VALUE",
        help="extra environment for the coordinator only, e.g. MALLOC_ARENA_MAX=2",
    )  # fmt: skip
    parser.add_argument(
        "--streams", action="store_true", help="workers exchange over gRPC streams (default: the data channel)"
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.coordinator_env)
    if args.warmup < 1 or args.rounds < 1:
        parser.error("--warmup and --rounds must be at least 1")
    print(
        f"simulated workers: threads in one process, chain {args.chain_ms:g} ms; coordinator: a subprocess, "
        f"fresh per row; MB = 1e6 bytes; {args.rounds} timed rounds after {args.warmup} warm-up; "
        f"coordinator env: {' '.join(args.coordinator_env) or 'unchanged'}; exchanges over "
        f"{'gRPC streams' if args.streams else 'the data channel'}; TCP bound: a round's bytes (2 x workers x "
        "model) through one loopback TCP echo, measured after each row, plus the chain"
    )
    print(
        f"{'params':>11}{'model MB':>10}{'workers':>9}{'rounds/s':>10}{'round s':>9}{'TCP bound s':>13}"
        f"{'round/bound':>13}{'idle RSS MB':>13}{'peak RSS MB':>13}{'peak-idle MB':>14}{'(peak-idle)/model':>19}"
    )
    results: dict[tuple[int, int], dict[str, float]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for params in args.params:
            for n in args.workers:
                r = measure(params, n, args.rounds, args.warmup, args.chain_ms / 1e3, Path(tmp), env, not args.streams)
                results[params, n] = r
                grown = r["peak_mb"] - r["idle_mb"]
                print(
                    f"{params:>11,}{r['model_mb']:>10.1f}{n:>9}{r['rounds_per_s']:>10.2f}{r['median_round_s']:>9.2f}"
                    f"{r['tcp_bound_s']:>13.2f}{r['median_round_s'] / r['tcp_bound_s']:>12.2f}x"
                    f"{r['idle_mb']:>13.0f}{r['peak_mb']:>13.0f}{grown:>14.0f}{grown / r['model_mb']:>18.1f}x",
                    flush=True,
                )
    lo, hi = min(args.workers), max(args.workers)
    if lo != hi:
        print(f"\npeak memory from {lo} to {hi} workers (per-worker increment = peak difference / {hi - lo}):")
        for params in args.params:
            a, b = results[params, lo], results[params, hi]
            per_worker = (b["peak_mb"] - a["peak_mb"]) / (hi - lo)
            above = (b["peak_mb"] - b["idle_mb"]) / max(a["peak_mb"] - a["idle_mb"], 1e-9)
            print(
                f"  {params:>11,} params ({a['model_mb']:.1f} MB): peak({hi})/peak({lo}) = "
                f"{b['peak_mb'] / a['peak_mb']:.2f}, (peak-idle)({hi})/(peak-idle)({lo}) = {above:.2f}, "
                f"{per_worker:+.2f} MB per extra worker = {per_worker / a['model_mb']:+.3f} model sizes"
            )
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
