"""The worker <-> coordinator contract in Python form, shared by every transport.

The gRPC proto mirrors these types; the in-process transport passes them directly. Tensors here
are flat CPU (or device) tensors; transports own copying and encoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch is heavy to import; the client commands use these types without tensors
    from torch import Tensor

    from protos.spec import JobSpec


@dataclass(frozen=True)
class RoundValues:
    """What the coordinator computes for round ``round`` (the schedules of docs/algorithm.md)."""

    round: int
    gamma: float
    rho: float
    lr: float
    epoch: float


@dataclass(frozen=True)
class Directives:
    """Duties the coordinator hands out with a round's result."""

    evaluate: bool = False  # fetch_model this round's model, evaluate it and report_eval it
    checkpoint: bool = False  # report_state this replica's whole state after the elastic step
    stop: bool = False  # the job is over (finished, cancelled or failed): leave
    export: bool = False  # with evaluate: also send the model's state dict
    model: bool = False  # report_state this replica's weights x after the elastic step (the model is their mean)


@dataclass(frozen=True)
class JoinGrant:
    worker_id: str
    job_id: str
    replica: int
    spec: JobSpec
    values: RoundValues  # the round this worker runs first
    start: Tensor | None  # the reference to start from; None: initialise from seed + replica
    replica_state: dict[str, Tensor] | None = None  # exact state saved in a checkpoint (resume)
    lease_s: float = 30.0
    seed_center: bool = False  # async job without a center yet: report_state(0, {"x": start}) before round 0
    # The coordinator took the worker back at the round its own state is at (join with resume_round): keep
    # that state, offer it (offer_state) and run ``values.round`` next; ``resume_duties`` are the duties of
    # the round closed just before, still outstanding for this worker (evaluate, export, stop).
    resume: bool = False
    resume_duties: Directives = field(default_factory=Directives)


@dataclass(frozen=True)
class RoundStats:
    """What a worker says about its chain alongside the coupled average."""

    train_loss: float
    inner_steps: int
    samples: int
    chain_seconds: float
    train_size: int = 0  # samples in the worker's training set (the schedule's unit); 0: not said


@dataclass(frozen=True)
class ExchangeReply:
    closed_round: int  # the round this reference closes
    reference: Tensor  # sync: the new center xbar_next; async: the center before this worker's elastic force
    next_values: RoundValues
    directives: Directives = field(default_factory=Directives)


@dataclass(frozen=True)
class EvalReport:
    round: int  # the model evaluated is the one of this closed round
    epoch: float
    results: dict[str, tuple[float, float]]  # split -> (loss, error fraction)
    model_state: dict[str, Tensor] | None = None  # the model's state dict when exported


class CoordinatorError(RuntimeError):
    """A request the coordinator refused; ``code`` mirrors the gRPC status (as in parle.proto)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[CoordinatorError], tuple[str, str]]:
        # Travels intact through pickling (Ray actor calls re-raise it on the caller's side).
        return (CoordinatorError, (self.code, str(self)))


class JobEndpoint(Protocol):
    """What a transport needs from one job's coordinator side (``coordinator.job.Job`` implements it)."""

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant: ...

    def exchange(
        self, worker_id: str, round: int, mu: Tensor, stats: RoundStats, timeout: float | None = None
    ) -> ExchangeReply: ...

    def heartbeat(self, worker_id: str) -> bool: ...

    def report_eval(self, worker_id: str, report: EvalReport) -> None: ...

    def report_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None: ...

    def offer_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None: ...

    def fetch_model(self, worker_id: str, round: int, timeout: float | None = None) -> Tensor: ...

    def fail(self, worker_id: str, reason: str) -> None: ...

    def leave(self, worker_id: str) -> None: ...
