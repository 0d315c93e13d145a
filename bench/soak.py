"""Soak: many simulated workers and a stream of jobs against one coordinator for a long time; does the
coordinator's memory or its open files grow?

A real ``parle coordinator`` (a subprocess, bench.scale's) on 127.0.0.1 serves ``--workers`` simulated
pool workers (threads of this process, each with its own ``GrpcTransport``, no model: bench.scale's
kind). A submitter keeps about workers / replicas jobs queued or running: each job ends by itself after a
random number of rounds, or is cancelled at random while it runs (the churn). A worker joins whichever job
needs one, exchanges a small tensor per round until its job ends or is cancelled, leaves, and joins the
next one.

Every ``--report-s`` seconds (and at start and end) one JSON line gives the coordinator's RSS and peak RSS
(``/proc/PID/status``), its open file descriptors (``/proc/PID/fd``) and threads, and the job and round
counts so far; a final ``summary`` line compares the end with the start.

    python -m bench.soak [--minutes 30] [--workers 64] [--replicas 4] [--params 10000] [--report-s 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import tensor_job
from bench.scale import Coordinator, coordinator
from cluster.client import Endpoint, JobsClient
from protos import parle_pb2 as pb
from protos.messages import CoordinatorError, RoundStats
from worker.transports.grpc import GrpcTransport

MB = 1e6
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@dataclass
class Tally:
    """What the workers and the submitter did, shared between threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    rounds: int = 0
    joins: int = 0
    submitted: int = 0
    cancelled: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # worker-side error codes (expected: job ended)
    examples: dict[str, str] = field(default_factory=dict)  # one message per code

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def error(self, where: str, err: CoordinatorError) -> None:
        key = f"{where} {err.code}"
        with self.lock:
            self.errors[key] += 1
            self.examples.setdefault(key, str(err)[:200])


def process_figures(coord: Coordinator) -> dict[str, float]:
    """RSS and peak RSS (MB), open file descriptors and threads of the coordinator process."""
    status = {}
    for line in Path(f"/proc/{coord.proc.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
    return {
        "rss_mb": round(int(status["VmRSS"]) * 1024 / MB, 1),
        "peak_rss_mb": round(int(status["VmHWM"]) * 1024 / MB, 1),
        "open_files": len(os.listdir(f"/proc/{coord.proc.pid}/fd")),
        "threads": int(status["Threads"]),
    }


def job_yaml(index: int, replicas: int, rounds: int, checkpoint_every: int) -> str:
    spec = tensor_job(f"soak-{index}", replicas, lease_s=20.0, start_timeout_s=60.0)
    spec["max_rounds"] = rounds
    spec["checkpoint"] = {"every_rounds": checkpoint_every}
    return yaml.safe_dump(spec)


def worker(address: str, i: int, mu: torch.Tensor, stop: threading.Event, tally: Tally, chain_s: float) -> None:
    """A pool worker: join any job, exchange until it ends (or is cancelled), leave, join the next."""
    stats = RoundStats(train_loss=0.0, inner_steps=1, samples=1, chain_seconds=chain_s, train_size=60000)
    checkpoint_state = {
        "x": mu,
        "outer_buf": torch.zeros_like(mu),
        "outer_steps": torch.zeros(1, dtype=torch.int64),
        "sampler": torch.zeros(2, dtype=torch.int64),
        "rng_noise": torch.Generator().get_state(),  # a replica's random streams, as a worker uploads them
        "rng_global": torch.get_rng_state(),
    }
    with GrpcTransport(address, timeout_s=120.0) as transport:
        while not stop.is_set():
            try:
                values = transport.join(f"soak-{i}", "cpu").values
            except CoordinatorError as err:  # UNAVAILABLE: no job needs a worker right now
                tally.error("join", err)
                stop.wait(1.0)
                continue
            tally.add(joins=1)
            try:
                while not stop.is_set():
                    stop.wait(chain_s)
                    reply = transport.exchange(values.round, mu, stats)
                    tally.add(rounds=1)
                    if reply.directives.checkpoint:  # what a checkpoint needs of a replica's state
                        transport.report_state(reply.closed_round, checkpoint_state)
                    elif reply.directives.model:
                        transport.report_state(reply.closed_round, {"x": mu})
                    if reply.directives.stop:
                        break
                    values = reply.next_values
            except CoordinatorError as err:  # the job was cancelled or ended under us
                tally.error("exchange", err)
            transport.leave()


def submitter(address: str, args: argparse.Namespace, stop: threading.Event, tally: Tally) -> None:
    """Keep about workers / replicas jobs alive; cancel a running one now and then."""
    rng = random.Random(0)
    target = max(1, args.workers // args.replicas)
    live: list[str] = []
    index = 0
    with JobsClient(Endpoint(address)) as client:
        while not stop.is_set():
            states = {job_id: client.get(job_id).state for job_id in live}
            live = [job_id for job_id in live if states[job_id] not in TERMINAL]
            while len(live) < target:
                index += 1
                rounds = rng.randint(args.min_rounds, args.max_rounds)
                live.append(client.submit(job_yaml(index, args.replicas, rounds, args.checkpoint_every)))
                tally.add(submitted=1)
            running = [job_id for job_id in live if states.get(job_id) == pb.JOB_STATE_RUNNING]
            if running and rng.random() < args.cancel_share:
                client.cancel(rng.choice(running))
                tally.add(cancelled=1)
            stop.wait(args.churn_s)
        for job_id in live:  # leave nothing running
            client.cancel(job_id)


def line(kind: str, started: float, coord: Coordinator, tally: Tally) -> dict[str, Any]:
    with tally.lock:
        counts = {
            "rounds": tally.rounds,
            "joins": tally.joins,
            "jobs_submitted": tally.submitted,
            "jobs_cancelled": tally.cancelled,
        }
    out = {"kind": kind, "elapsed_s": round(time.monotonic() - started, 1), **process_figures(coord), **counts}
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run")
    parser.add_argument("--workers", type=int, default=64, help="simulated pool workers (threads)")
    parser.add_argument("--replicas", type=int, default=4, help="replicas per job")
    parser.add_argument("--params", type=int, default=10_000, help="float32 elements each worker exchanges")
    parser.add_argument("--min-rounds", type=int, default=20, help="a job's rounds: at least")
    parser.add_argument("--max-rounds", type=int, default=80, help="a job's rounds: at most")
    parser.add_argument("--chain-ms", type=float, default=50.0, help="simulated chain time per round")
    parser.add_argument("--churn-s", type=float, default=2.0, help="how often the submitter looks at the jobs")
    parser.add_argument("--cancel-share", type=float, default=0.3, help="chance per look of cancelling a job")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="a job checkpoints every N rounds")
    parser.add_argument("--report-s", type=float, default=60.0, help="seconds between figure lines")
    parser.add_argument(
        "--metrics-retention-s", type=float, help="the coordinator's --metrics-retention-s (default: its own, 1 h)"
    )
    parser.add_argument("--log", type=Path, help="the coordinator's log (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.workers < args.replicas or args.min_rounds > args.max_rounds:
        parser.error("need --workers >= --replicas and --min-rounds <= --max-rounds")
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(args.params, generator=gen)
    tally, stop = Tally(), threading.Event()
    if args.log is None:
        fd, name = tempfile.mkstemp(prefix="soak-coordinator-", suffix=".log")
        os.close(fd)
        args.log = Path(name)
    log: Path = args.log
    flags = () if args.metrics_retention_s is None else ("--metrics-retention-s", str(args.metrics_retention_s))
    with (
        tempfile.TemporaryDirectory(prefix="soak-") as tmp,
        coordinator(Path(tmp) / "state", extra=flags, log=log) as coord,
    ):
        started = time.monotonic()
        first = line("start", started, coord, tally)
        threads = [threading.Thread(target=submitter, args=(coord.address, args, stop, tally), daemon=True)]
        threads += [
            threading.Thread(target=worker, args=(coord.address, i, mu, stop, tally, args.chain_ms / 1e3), daemon=True)
            for i in range(args.workers)
        ]
        for t in threads:
            t.start()
        end = started + args.minutes * 60
        samples = [first]
        while time.monotonic() < end:
            time.sleep(max(0.0, min(args.report_s, end - time.monotonic())))
            samples.append(line("sample", started, coord, tally))
        stop.set()
        for t in threads:
            t.join(timeout=60)
        time.sleep(2.0)  # the cancelled jobs' files close
        last = line("end", started, coord, tally)
    settled = samples[len(samples) // 4 :]  # after warm-up: the first quarter of the run
    summary = {
        "kind": "summary",
        "minutes": args.minutes,
        "workers": args.workers,
        "replicas": args.replicas,
        "params": args.params,
        "metrics_retention_s": args.metrics_retention_s,
        "rss_mb_start": first["rss_mb"],
        "rss_mb_after_warmup": settled[0]["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_mb_max": max(s["rss_mb"] for s in [*samples, last]),
        "open_files_start": first["open_files"],
        "open_files_max": max(s["open_files"] for s in [*samples, last]),
        "open_files_end": last["open_files"],
        "rounds": last["rounds"],
        "jobs_submitted": last["jobs_submitted"],
        "jobs_cancelled": last["jobs_cancelled"],
        "worker_errors": dict(tally.errors),
        "worker_error_examples": tally.examples,
        "stragglers": sum(t.is_alive() for t in threads),
        "coordinator_internal_errors": log.read_text().count("internal error in "),
        "coordinator_log": str(log),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
