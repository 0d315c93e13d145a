"""The reproduction: SGD, Entropy-SGD, Elastic-SGD, Parle and EASGD on LeNet / Fashion-MNIST, 3 seeds each.

    python -m bench.reproduce                          # both regimes, seeds 0 1 2; resumable
    python -m bench.reproduce --regimes small --seeds 0 --methods sgd parle
    python -m bench.reproduce --report-only            # tables and plots from what has finished

Two regimes (``REGIMES``): the full training set for 10 data passes per replica, and a fixed 5,000-image
subset (``data.train_limit``) for 100 data passes per replica, where SGD overfits. Every method gets the
same data passes per replica; ``sgd-x3`` gets n = 3 times as many (the same total gradients as the
3-replica methods). Every method but EASGD (whose SGD step is the unscheduled inner_lr) drops its learning
rate 10x at 60% of its budget. Scoping is sized to
the budget as the authors size theirs: their parle.py grows gamma and rho by (1 + 0.5/nb) per round for
5 of their epochs of nb rounds, a factor e^2.5 in all; here the same factor over our budget's rounds.

Each run is a run directory ``OUT/REGIME/METHOD/seedS`` trained through the local runtime; a finished run
(its ``summary.json`` exists) is skipped, an interrupted one resumes from its last checkpoint, so the
command can be stopped and started again. ``OUT/results.md`` gets one table per regime (mean and standard
deviation over the finished seeds) and ``OUT/REGIME.png`` the test-error curves of seed 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cluster.local import preflight, run_local
from cluster.plot import plot_runs
from coordinator.events import read_events
from coordinator.schedules import Schedule
from protos.spec import JobSpec, resolve

REGIMES: dict[str, dict[str, Any]] = {
    "full": {"epochs": 10.0, "data": {}, "eval_every": 1.0},
    "small": {"epochs": 100.0, "data": {"train_limit": 5000}, "eval_every": 10.0},
}
METHODS = ["sgd", "sgd-x3", "entropy-sgd", "elastic-sgd", "parle", "easgd"]
SCOPING_FACTOR = math.exp(2.5)  # the authors' total growth over their default budget (see the docstring)


def job(regime: str, method: str, seed: int, batch_size: int = 128) -> dict[str, Any]:
    """The job of one run, before the budget-sized scoping (which needs the data set's size)."""
    r = REGIMES[regime]
    preset = "sgd" if method == "sgd-x3" else method
    replicas = 1 if preset in ("sgd", "entropy-sgd") else 3
    epochs = r["epochs"] * (3 if method == "sgd-x3" else 1)
    return {
        "name": f"{regime}-{method}-s{seed}",
        "preset": preset,
        "replicas": replicas,
        "epochs": epochs,
        "seed": seed,
        "model": {"name": "lenet"},
        "data": {"name": "fashion-mnist", "batch_size": batch_size, **r["data"]},
        # EASGD's step size is its inner (SGD) learning rate, which has no schedule: it runs without the drop.
        "optim": {"lr_drop_epochs": [] if method == "easgd" else [round(0.6 * epochs, 4)]},
        "eval": {"every_epochs": r["eval_every"] * (3 if method == "sgd-x3" else 1), "train_subset": 5000},
    }


def sized(raw: dict[str, Any], train_size: int) -> JobSpec:
    """Set gamma and rho growth so that they grow by SCOPING_FACTOR over the budget (capped)."""
    spec = resolve(raw)
    rounds = Schedule(spec, train_size).total_rounds
    growth = SCOPING_FACTOR ** (1.0 / rounds) - 1.0
    optim = dict(raw["optim"])
    if spec.optim.gamma0 > 0:
        optim["gamma_growth"] = growth
    if spec.optim.rho0 > 0:
        optim["rho_growth"] = growth
    return resolve({**raw, "optim": optim})


def summarize(run_dir: Path) -> dict[str, Any]:
    """The run's figures and a thinned copy of its events (every eval, at most ~400 rounds) for the plots:
    ``summary.json`` is what gets committed, the run directory (checkpoints, full log) is not."""
    events = read_events(run_dir / "metrics.jsonl")
    tests = [e for e in events if e["kind"] == "eval" and e["split"] == "test"]
    trains = [e for e in events if e["kind"] == "eval" and e["split"] == "train"]
    rounds = [e for e in events if e["kind"] == "round"]
    every = max(1, len(rounds) // 400)
    kept = [e for e in events if e["kind"] == "eval"] + rounds[::every]
    return {
        "final_test": 100 * tests[-1]["error"],
        "best_test": 100 * min(e["error"] for e in tests),
        "final_train": 100 * trains[-1]["error"] if trains else float("nan"),
        "epochs": tests[-1]["epoch"],
        "seconds": rounds[-1]["time"],
        "events": sorted(kept, key=lambda e: (e["time"], e["kind"])),
    }


def run_one(out: Path, regime: str, method: str, seed: int, device: str) -> dict[str, Any] | None:
    run_dir = out / regime / method / f"seed{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file():
        done: dict[str, Any] = json.loads(summary.read_text())
        return done
    raw = {**job(regime, method, seed), "device": device}
    spec = resolve(raw)
    train_size = preflight(spec)
    spec = sized(raw, train_size)
    resume = (run_dir / "config.yaml").is_file()
    started = time.monotonic()
    print(
        f"[{time.strftime('%H:%M:%S')}] {regime}/{method}/seed{seed}: {'resuming' if resume else 'starting'}",
        flush=True,
    )
    result = run_local(spec, run_dir, resume=resume, train_size=train_size)
    if result.state.value != "succeeded":
        print(f"  {result.state.value}: {result.message or result.errors}", flush=True)
        return None
    figures = summarize(run_dir)
    summary.write_text(json.dumps(figures))
    print(f"  done in {time.monotonic() - started:.0f}s: test error {figures['final_test']:.2f}%", flush=True)
    return figures


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(out: Path, seeds: list[int]) -> str:
    lines = ["# Reproduction results", "", "Regenerate: `python -m bench.reproduce` (resumable; see its docstring)."]
    lines.append("")
    for regime, r in REGIMES.items():
        size = "5,000-image subset" if r["data"] else "full training set (60,000)"
        lines += [
            f"## {regime}: LeNet-BN, Fashion-MNIST {size}, {r['epochs']:g} data passes per replica",
            "",
            "| method | n | seeds | final test error % | best test error % | final train error % | wall-clock s |",
            "|---|---|---|---|---|---|---|",
        ]
        curves: dict[str, list[dict[str, Any]]] = {}
        for method in METHODS:
            rows = []
            for seed in seeds:
                summary = out / regime / method / f"seed{seed}" / "summary.json"
                if summary.is_file():
                    rows.append(json.loads(summary.read_text()))
            n = job(regime, method, 0)["replicas"]
            cols = [_cell([row[k] for row in rows]) for k in ("final_test", "best_test", "final_train", "seconds")]
            lines.append(f"| {method} | {n} | {len(rows)} | " + " | ".join(cols) + " |")
            first = out / regime / method / f"seed{seeds[0]}" / "summary.json"
            if first.is_file():
                curves[method] = json.loads(first.read_text()).get("events", [])
        if curves:
            plot_runs(curves, out / f"{regime}.png")
            lines += ["", f"![{regime}]({regime}.png)"]
        lines.append("")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reproduction"))
    parser.add_argument("--report-only", action="store_true", help="only write results.md and the plots")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); e.g. 1 per process")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:  # seed by seed: a stopped run leaves whole seeds behind
            for regime in args.regimes:
                for method in args.methods:
                    run_one(args.out, regime, method, seed, args.device)
                    report(args.out, args.seeds)
    print(report(args.out, args.seeds))


if __name__ == "__main__":
    main()
