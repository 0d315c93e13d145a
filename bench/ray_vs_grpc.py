"""Per-round exchange time through Ray vs through gRPC, 3 replicas, lenet- and mnistfc-sized references.

Three simulated workers (threads, no model) exchange a flat float32 tensor of the model's size each round,
once through the Ray transport (coordinator actor, reference through the object store once per round)
and once through the gRPC transport (a coordinator server on 127.0.0.1), in the same run. The round
time is from the moment all three start their exchange to the moment the last one holds the reference.

    python -m bench.ray_vs_grpc [--rounds 20]

Starts a private local Ray instance (loopback, no auth) and stops it at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import STATS, tensor_job
from protos.spec import JobSpec, resolve
from worker.transports import WorkerTransport

SIZES = {"lenet": 132_220, "mnistfc": 1_867_786}


def job_spec(replicas: int) -> JobSpec:
    return resolve(tensor_job("bench", replicas))


def time_rounds(transports: list[WorkerTransport], numel: int, rounds: int) -> list[float]:
    """Seconds per round: three workers exchange concurrently; a barrier lines up each round's start."""
    for i, transport in enumerate(transports):
        transport.join(f"sim{i}", "cpu", i)
    barrier = threading.Barrier(len(transports) + 1)
    done = threading.Barrier(len(transports) + 1)
    tensors = [torch.randn(numel) for _ in transports]

    def worker(i: int) -> None:
        for k in range(rounds):
            barrier.wait()
            transports[i].exchange(k, tensors[i], STATS)
            done.wait()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(transports))]
    for t in threads:
        t.start()
    times = []
    for _ in range(rounds):
        barrier.wait()
        started = time.perf_counter()
        done.wait()
        times.append(time.perf_counter() - started)
    for t in threads:
        t.join(timeout=30)
    return times[2:]  # the first rounds pay for connections and the first object-store puts


def grpc_rounds(spec: JobSpec, numel: int, rounds: int, state: Path) -> list[float]:
    from coordinator.server import CoordinatorServer
    from worker.transports.grpc import GrpcTransport

    with CoordinatorServer(state) as server:
        job_id = server.manager.submit(spec)
        transports = [GrpcTransport(server.address, job_id=job_id) for _ in range(spec.replicas)]
        try:
            return time_rounds(list(transports), numel, rounds)
        finally:
            for t in transports:
                t.close()


def ray_rounds(spec: JobSpec, numel: int, rounds: int, state: Path) -> list[float]:
    from cluster.ray_runtime import CoordinatorActor
    from worker.transports.ray import RayTransport

    actor: Any = CoordinatorActor.options(max_concurrency=16).remote("bench", spec, str(state), False, 0)  # type: ignore[attr-defined]
    return time_rounds([RayTransport(actor) for _ in range(spec.replicas)], numel, rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR)
    spec = job_spec(args.replicas)
    print(f"{args.replicas} replicas, {args.rounds - 2} timed rounds, median ms per round (exchange only)")
    print(f"{'model':<9}{'params':>11}{'MB':>7}{'gRPC ms':>10}{'Ray ms':>9}{'Ray/gRPC':>10}")
    runners: dict[str, Callable[[JobSpec, int, int, Path], list[float]]] = {"grpc": grpc_rounds, "ray": ray_rounds}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, numel in SIZES.items():
                medians = {
                    key: 1e3 * statistics.median(run(spec, numel, args.rounds, Path(tmp) / f"{key}-{name}"))
                    for key, run in runners.items()
                }
                print(
                    f"{name:<9}{numel:>11,}{numel * 4 / 1e6:>7.2f}{medians['grpc']:>10.1f}{medians['ray']:>9.1f}"
                    f"{medians['ray'] / medians['grpc']:>9.2f}x"
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
