"""The Ray worker transport: the worker loop's calls as method calls on the job's coordinator actor.

The coordinator actor puts each round's reference into the object store once and hands every worker
the same ``ObjectRef`` (inside a list, so Ray passes the ref instead of resolving it); workers read it
from shared memory. Every ``ray.get`` has a timeout: a call that cannot be served never waits forever.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from torch import Tensor

from protos.messages import CoordinatorError, EvalReport, ExchangeReply, JoinGrant, RoundStats

T = TypeVar("T")


def get(ref: Any, timeout_s: float | None) -> Any:
    """``ray.get`` with the project's errors: the coordinator's own ``CoordinatorError`` comes through
    unchanged; a dead coordinator actor is UNAVAILABLE; a timeout is DEADLINE_EXCEEDED."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as err:
        if isinstance(err.cause, CoordinatorError):
            raise err.cause from None
        raise
    except RayActorError as err:
        raise CoordinatorError("UNAVAILABLE", f"the coordinator actor is gone: {err}") from None
    except GetTimeoutError:
        raise CoordinatorError("DEADLINE_EXCEEDED", f"no answer from the coordinator actor in {timeout_s}s") from None


class RayTransport:
    def __init__(self, coordinator: Any, timeout_s: float = 120.0) -> None:
        self.coordinator = coordinator  # a CoordinatorActor handle
        self.timeout_s = timeout_s
        self.worker_id = ""
        self._round_timeout_s = timeout_s

    def _call(self, method: Any, *args: Any, timeout_s: float | None = None) -> Any:
        return get(method.remote(*args), timeout_s or self.timeout_s)

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant:
        grant: JoinGrant = self._call(self.coordinator.join, name, device, want_replica, resume_round)
        self.worker_id = grant.worker_id
        self._round_timeout_s = grant.spec.optim.round_deadline_s + self.timeout_s
        return grant

    def exchange(self, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply:
        closed, holder, values, directives = self._call(
            self.coordinator.exchange, self.worker_id, round, mu, stats, timeout_s=self._round_timeout_s
        )
        reference = get(holder[0], self.timeout_s)
        return ExchangeReply(closed, reference, values, directives)

    def heartbeat(self) -> bool:
        return bool(self._call(self.coordinator.heartbeat, self.worker_id))

    def report_eval(self, report: EvalReport) -> None:
        self._call(self.coordinator.report_eval, self.worker_id, report)

    def report_state(self, round: int, state: dict[str, Tensor]) -> None:
        self._call(self.coordinator.report_state, self.worker_id, round, state)

    def offer_state(self, round: int, state: dict[str, Tensor]) -> None:
        self._call(self.coordinator.offer_state, self.worker_id, round, state)

    def fetch_model(self, round: int) -> Tensor:
        timeout = self._round_timeout_s
        return self._call(self.coordinator.fetch_model, self.worker_id, round, timeout, timeout_s=timeout + 10.0)

    def fail(self, reason: str) -> None:
        self._call(self.coordinator.fail, self.worker_id, reason)

    def leave(self) -> None:
        if self.worker_id:
            worker_id, self.worker_id = self.worker_id, ""
            self._call(self.coordinator.leave, worker_id)

    def close(self) -> None:
        with contextlib.suppress(CoordinatorError):
            self.leave()
