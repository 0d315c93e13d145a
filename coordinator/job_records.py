"""The small records a job keeps: its state, its members, a closed round, a checkpoint being gathered."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import Tensor

from protos.messages import RoundValues


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Member:
    worker_id: str
    name: str
    replica: int
    device: str
    last_seen: float
    round: int  # async: this worker's own round


@dataclass
class ClosedRound:
    """What the waiters of a closed sync round collect."""

    reference: Tensor
    next_values: RoundValues
    evaluator: str | None
    checkpoint: bool
    stop: bool


@dataclass
class PendingCheckpoint:
    round: int
    reference: Tensor
    expected: set[int]
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)
