"""The share of a round's wall-clock spent outside the workers' chains: Parle, 3 replicas, LeNet, L = 25,
Fashion-MNIST, through the process mode (a coordinator + 3 ``parle worker`` processes on loopback gRPC,
``cluster.processes.run_processes``) and, for comparison, the in-process runtime (``cluster.local``).

    python -m bench.coordinator_overhead [--rounds 10] [--modes processes local]

The coordinator runs in this process in both modes, so a thin wrapper around ``Job.report`` records
each worker's ``chain_seconds`` and when its coupled average arrived, and a job listener records when
each round closed. Per round (the first is left out: it includes process start-up and data loading):

- ``round``: the coordinator's ``round_seconds`` (round k opens when round k-1 closes);
- ``max-chain share``: 1 - chain_seconds / round_seconds, chain_seconds being the slowest worker's chain
  (the definition in the issue; target < 3%);
- ``idle share``: the part of the round during which *no* chain runs, taking worker a's chain as the
  interval [arrival_a - chain_a, arrival_a] (its upload counts as chain time, a few ms at most here);
- ``exchange``: the mean time from a worker's report arriving to its round closing, i.e. waiting for
  the other replicas plus the aggregation (what the worker sees as its exchange, less the transfers).

The two shares differ when chains do not overlap. With 3 workers on 2 cores the chains overlap and
compete for the cores, so the slowest chain stretches to cover most of the round. The in-process runtime
runs the replicas' chains one after the other (``OrderedTurns``), so the slowest chain is only about a
third of the round: its max-chain share is large by construction and says nothing about the
coordinator. Its idle share is the figure to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from cluster.local import run_local
from cluster.processes import run_processes
from coordinator.job import Job
from protos.messages import ExchangeReply, RoundStats
from protos.spec import JobSpec, resolve


@dataclass
class Recorder:
    """Reports (arrival time, chain seconds) per round, and each round's close time and event."""

    reports: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    closes: dict[int, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, round: int, stats: RoundStats) -> None:
        with self.lock:
            self.reports.setdefault(round, []).append((time.monotonic(), stats.chain_seconds))

    def __call__(self, event: dict[str, Any]) -> None:  # a job listener, called as the event is emitted
        if event.get("kind") == "round":
            with self.lock:
                self.closes[event["round"]] = (time.monotonic(), event)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Wrap ``Job.report`` (both runtimes call it once per worker and round) for the duration."""
    original = Job.report

    def report(
        self: Job, worker_id: str, round: int, mu: Tensor, stats: RoundStats, **flags: bool
    ) -> ExchangeReply | None:
        recorder.report(round, stats)
        return original(self, worker_id, round, mu, stats, **flags)

    Job.report = report  # type: ignore[method-assign]
    try:
        yield
    finally:
        Job.report = original  # type: ignore[method-assign]


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` clipped to [start, end]."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def summarize(rec: Recorder, skip: int = 1) -> dict[str, float]:
    rounds: list[float] = []
    max_share: list[float] = []
    idle_share: list[float] = []
    waits: list[float] = []
    for k in sorted(rec.closes)[skip:]:
        closed_at, event = rec.closes[k]
        seconds = event["round_seconds"]
        chains = [(arrived - chain, arrived) for arrived, chain in rec.reports.get(k, [])]
        rounds.append(seconds)
        max_share.append(1.0 - event["chain_seconds"] / seconds)
        idle_share.append(1.0 - covered(chains, closed_at - seconds, closed_at) / seconds)
        waits.extend(closed_at - arrived for arrived, _ in rec.reports.get(k, []))
    chains_all = [c for k in sorted(rec.closes)[skip:] for _, c in rec.reports.get(k, [])]
    return {
        "rounds": len(rounds),
        "round_s": statistics.mean(rounds),
        "chain_s": statistics.mean(chains_all),
        "max_chain_s": statistics.mean(rec.closes[k][1]["chain_seconds"] for k in sorted(rec.closes)[skip:]),
        "max_share": statistics.mean(max_share),
        "idle_share": statistics.mean(idle_share),
        "idle_s": statistics.mean(s * r for s, r in zip(idle_share, rounds, strict=True)),
        "exchange_s": statistics.mean(waits),
    }


def bench_spec(rounds: int) -> JobSpec:
    # Evaluation and checkpoints only after the last round (it always has both), outside the measured rounds.
    return resolve(
        {
            "name": "overhead",
            "preset": "parle",
            "replicas": 3,
            "max_rounds": rounds,
            "model": {"name": "lenet"},
            "data": {"name": "fashion-mnist", "batch_size": 128},
            "optim": {"L": 25},
            "eval": {"every_epochs": 1e6, "train_subset": 0},
            "checkpoint": {"every_rounds": 10**6},
        }
    )


def run_mode(mode: str, spec: JobSpec, root: Path) -> tuple[dict[str, float], float, str]:
    recorder = Recorder()
    started = time.monotonic()
    with recording(recorder):
        if mode == "processes":
            state, message = run_processes(spec, root / mode, spec.replicas, [recorder])
            outcome = state.value if not message else f"{state.value}: {message}"
        else:
            result = run_local(spec, root / mode, listeners=[recorder])
            outcome = result.state.value if not result.message else f"{result.state.value}: {result.message}"
    return summarize(recorder), time.monotonic() - started, outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (the first is not counted)")
    parser.add_argument("--modes", nargs="+", default=["processes", "local"], choices=["processes", "local"])
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is not counted)")
    spec = bench_spec(args.rounds)
    print(
        f"parle, {spec.replicas} replicas, {spec.model.name}, L = {spec.optim.L}, {spec.data.name} batch "
        f"{spec.data.batch_size}; means over rounds 2..{args.rounds}"
    )
    header = (
        f"{'runtime':<11}{'rounds':>7}{'round s':>9}{'chain s':>9}{'max chain s':>13}{'max-chain share':>17}"
        f"{'idle share':>12}{'idle ms':>9}{'exchange ms':>13}{'total s':>9}  state"
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for mode in args.modes:
            s, total, outcome = run_mode(mode, spec, Path(tmp))
            print(
                f"{mode:<11}{s['rounds']:>7.0f}{s['round_s']:>9.3f}{s['chain_s']:>9.3f}{s['max_chain_s']:>13.3f}"
                f"{100 * s['max_share']:>16.1f}%{100 * s['idle_share']:>11.1f}%{1e3 * s['idle_s']:>9.1f}"
                f"{1e3 * s['exchange_s']:>13.1f}{total:>9.1f}  {outcome}",
                flush=True,
            )


if __name__ == "__main__":
    main()
