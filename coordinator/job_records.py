"""The small records a job keeps: its state, its members, a closed round, a model being gathered."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import Tensor

from coordinator.reference import SyncMean
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
    offer_round: int | None = None  # taken back with its own state at this round: its offer is awaited
    rerun_round: int | None = None  # taken back at the round just closed: it runs it again for the reply


@dataclass
class ClosedRound:
    """What the waiters of a closed sync round collect."""

    reference: Tensor
    next_values: RoundValues
    evaluator: str | None
    checkpoint: bool
    stop: bool
    model: bool  # every replica uploads its x: the model of this round is needed


@dataclass
class PendingModel:
    """The model of closed round ``round`` being gathered: the mean of the replicas' x after their elastic
    step, and (on checkpoint rounds) their whole states. Only the running sum is kept otherwise."""

    round: int
    center: Tensor
    expected: set[int]
    checkpoint: bool
    total: SyncMean = field(default_factory=SyncMean)
    reported: set[int] = field(default_factory=set)
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.reported >= self.expected
