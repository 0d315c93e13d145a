"""Worker transports: how the worker loop reaches its job's coordinator side.

All of them (in-process, gRPC, Ray) implement ``WorkerTransport`` and pass the shared transport
test suite (tests/transport_suite.py).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from protos.messages import EvalReport, ExchangeReply, JoinGrant, RoundStats


class WorkerTransport(Protocol):
    """One worker's connection to one job. Calls raise ``protos.messages.CoordinatorError``."""

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant:
        """``resume_round``: this worker still holds its replica at the start of that round (it lost its
        coordinator) and asks to be taken back with it (``JoinGrant.resume``)."""
        ...

    def exchange(self, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply:
        """Send the coupled average of ``round``; block until the new reference is known."""
        ...

    def heartbeat(self) -> bool:
        """Renew the lease; False once the job is over."""
        ...

    def report_eval(self, report: EvalReport) -> None: ...

    def report_state(self, round: int, state: dict[str, Tensor]) -> None:
        """Upload this replica's state (or its weights ``x`` alone) after the elastic step of ``round``."""
        ...

    def offer_state(self, round: int, state: dict[str, Tensor]) -> None:
        """After a join that took the worker back (``JoinGrant.resume``): its whole state at ``round``."""
        ...

    def fetch_model(self, round: int) -> Tensor:
        """The job's model after ``round`` (the mean of the replicas' x); blocks until every replica uploaded."""
        ...

    def fail(self, reason: str) -> None: ...

    def leave(self) -> None: ...

    def close(self) -> None: ...
