"""``parle plot``: test error and train loss against data passes and wall-clock, one line per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt

from coordinator.events import read_events


def curves(events: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float]]]:
    """(epoch, seconds, value) series: train_loss per round, test_error per test eval."""
    out: dict[str, list[tuple[float, float, float]]] = {"train_loss": [], "test_error": []}
    for e in events:
        if e.get("kind") == "round":
            out["train_loss"].append((e["epoch"], e["time"], e["train_loss"]))
        elif e.get("kind") == "eval" and e.get("split") == "test":
            out["test_error"].append((e["epoch"], e["time"], 100.0 * e["error"]))
    return out


def smooth(values: tuple[float, ...], points: int = 200) -> list[float]:
    """Trailing mean over about len/points rounds: per-mini-batch losses (L = 0) are too noisy to read."""
    window = max(1, len(values) // points)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, list[dict[str, Any]]], output: Path) -> Path:
    """``runs`` maps a label to its events; writes a 2 x 2 figure to ``output``."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for label, events in runs.items():
        series = curves(events)
        for row, (key, ylabel) in enumerate((("test_error", "test error (%)"), ("train_loss", "train loss"))):
            points = series[key]
            if not points:
                continue
            epochs, seconds, raw = zip(*points, strict=True)
            values = raw if key == "test_error" else smooth(raw)
            style = "o-" if key == "test_error" else "-"
            axes[row][0].plot(epochs, values, style, label=label, markersize=3)
            axes[row][1].plot(seconds, values, style, label=label, markersize=3)
            axes[row][0].set_ylabel(ylabel)
    for ax in axes[1]:
        ax.set_yscale("log")
    axes[1][0].set_xlabel("data passes per replica (epochs)")
    axes[1][1].set_xlabel("wall-clock (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def plot_run_dirs(run_dirs: list[Path], output: Path) -> Path:
    runs = {}
    for run_dir in run_dirs:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
        runs[run_dir.name] = read_events(metrics)
    return plot_runs(runs, output)
