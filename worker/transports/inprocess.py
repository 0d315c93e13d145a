"""The in-process transport: direct calls into the job's coordinator side in this process.

Tensors are passed by reference, not copied: the coordinator reads the coupled average before
``exchange`` returns and workers treat the returned reference as read-only.
"""

from __future__ import annotations

from torch import Tensor

from protos.messages import CoordinatorError, EvalReport, ExchangeReply, JobEndpoint, JoinGrant, RoundStats


class InProcessTransport:
    def __init__(self, endpoint: JobEndpoint, timeout_s: float | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.worker_id: str | None = None

    def _id(self) -> str:
        if self.worker_id is None:
            raise CoordinatorError("FAILED_PRECONDITION", "join the job first")
        return self.worker_id

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant:
        grant = self.endpoint.join(name, device, want_replica, resume_round)
        self.worker_id = grant.worker_id
        return grant

    def exchange(self, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply:
        return self.endpoint.exchange(self._id(), round, mu, stats, self.timeout_s)

    def heartbeat(self) -> bool:
        return self.endpoint.heartbeat(self._id())

    def report_eval(self, report: EvalReport) -> None:
        self.endpoint.report_eval(self._id(), report)

    def report_state(self, round: int, state: dict[str, Tensor]) -> None:
        self.endpoint.report_state(self._id(), round, state)

    def offer_state(self, round: int, state: dict[str, Tensor]) -> None:
        self.endpoint.offer_state(self._id(), round, state)

    def fetch_model(self, round: int) -> Tensor:
        return self.endpoint.fetch_model(self._id(), round, self.timeout_s)

    def fail(self, reason: str) -> None:
        self.endpoint.fail(self._id(), reason)

    def leave(self) -> None:
        if self.worker_id is not None:
            self.endpoint.leave(self.worker_id)
            self.worker_id = None

    def close(self) -> None:
        self.leave()

    def __enter__(self) -> InProcessTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
