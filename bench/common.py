"""What several benchmarks share: a job for simulated workers that exchange bare tensors."""

from __future__ import annotations

from typing import Any

from protos.messages import RoundStats

# What a simulated worker reports with each exchange (no model, no chain).
STATS = RoundStats(train_loss=0.0, inner_steps=1, samples=1, chain_seconds=0.0, train_size=60000)


def tensor_job(name: str, replicas: int, **runtime: Any) -> dict[str, Any]:
    """A sync job that never ends, evaluates or checkpoints while a benchmark runs. The coordinator builds no
    model, so the model and data only have to validate; workers exchange whatever flat tensor they like."""
    return {
        "name": name,
        "preset": "parle",
        "replicas": replicas,
        "epochs": 1e6,
        "max_rounds": 10**9,
        "model": {"name": "lenet"},
        "data": {"name": "synthetic", "batch_size": 16, "synthetic_size": 16},
        "optim": {"L": 1, "round_deadline_s": 3600.0},
        "eval": {"every_epochs": 1e12},
        "checkpoint": {"every_rounds": 10**9},
        "runtime": {"lease_s": 3600.0, **runtime},
    }
