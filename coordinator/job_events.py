"""What a job reports as it runs, typed where it happens; one JSON object each in ``metrics.jsonl``.

``Job`` builds these and turns them into plain dicts (``as_record``, stamped with the job id and the
job's elapsed seconds) only at the edge: the event log, the ``Watch`` stream, Prometheus, progress bars
and the registry all read that one record format, which stays stable across versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class JobEvent:
    kind: ClassVar[str]

    def as_record(self) -> dict[str, Any]:
        """The event's record: ``kind`` then its fields, in declaration order."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RoundClosed(JobEvent):
    kind: ClassVar[str] = "round"
    round: int
    epoch: float
    gamma: float
    rho: float
    lr: float
    train_loss: float
    consensus_distance: float
    workers: int
    round_seconds: float
    chain_seconds: float


@dataclass(frozen=True)
class Evaluated(JobEvent):
    kind: ClassVar[str] = "eval"
    round: int
    epoch: float
    split: str
    loss: float
    error: float


@dataclass(frozen=True)
class StateChanged(JobEvent):
    kind: ClassVar[str] = "state"
    state: str
    message: str
    round: int


@dataclass(frozen=True)
class MemberChanged(JobEvent):
    """``event``: join, leave, lease, lost, ...; ``start`` (joins only): where the replica's weights came from."""

    kind: ClassVar[str] = "member"
    event: str
    replica: int
    workers: int
    start: str | None = None

    def as_record(self) -> dict[str, Any]:
        record = super().as_record()
        if self.start is None:
            del record["start"]
        return record


@dataclass(frozen=True)
class CheckpointWritten(JobEvent):
    kind: ClassVar[str] = "checkpoint"
    round: int
    path: str
    seconds: float


@dataclass(frozen=True)
class CheckpointFailed(JobEvent):
    kind: ClassVar[str] = "checkpoint_failed"
    round: int
    error: str


@dataclass(frozen=True)
class Resumed(JobEvent):
    """A coordinator took the job up again at ``round``, from ``source`` (``round-state`` or ``checkpoint``)."""

    kind: ClassVar[str] = "resume"
    round: int
    source: str
    checkpoint: int | None

    def as_record(self) -> dict[str, Any]:  # the record says ``from``, a Python keyword
        return {"kind": self.kind, "round": self.round, "from": self.source, "checkpoint": self.checkpoint}
