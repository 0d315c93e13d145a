"""When a round closes: the round clock's decisions, pure (no lock, no thread, no clock of its own).

A sync round waits until every requested replica has joined (the *gang*: the first rounds are not
closed by whichever worker happened to start first), or until ``start_timeout_s`` after the first join;
it then closes when every live member has reported, or ``round_deadline_s`` after it opened, on whoever
reported. A member that leaves or misses its lease no longer counts: it may be the one everyone waited
for. Async rounds count reports instead: one job round is one report per replica, whoever sends them.

``SyncRounds`` takes each happening with the time it happened (``now``, any monotonic clock) and answers
with what follows, as typed decisions the job applies under its lock (``coordinator.job.Job``): tests
drive it with made-up times (tests/test_rounds.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GangOpened:
    """Rounds run from now on. ``members`` < ``replicas``: the start timeout passed first."""

    members: int
    replicas: int

    @property
    def short(self) -> bool:
        return self.members < self.replicas


@dataclass(frozen=True)
class CloseRound:
    """Close the open round now, on the members that reported."""

    deadline_passed: bool  # False: every live member reported


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (unless something else happens first)."""

    until: float


Decision = GangOpened | CloseRound | Wait


@dataclass
class SyncRounds:
    """The open sync round's members and reports, and its clock."""

    replicas: int
    start_timeout_s: float
    round_deadline_s: float
    gang_ready: bool = False
    members: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    first_join: float | None = None
    opened_at: float = 0.0

    @property
    def all_reported(self) -> bool:
        return self.gang_ready and bool(self.members) and self.reported >= self.members

    def join(self, worker: str, now: float) -> list[Decision]:
        self.members.add(worker)
        if self.first_join is None:
            self.first_join = now
        if len(self.members) >= self.replicas:
            return self._open_gang(now)
        return []

    def report(self, worker: str, now: float) -> list[Decision]:
        """``worker`` (a member) reported the open round."""
        self.reported.add(worker)
        return [CloseRound(deadline_passed=False)] if self.all_reported else []

    def leave(self, worker: str, now: float) -> list[Decision]:
        """``worker`` left, missed its lease or was lost: the round closes if it was the one awaited."""
        self.members.discard(worker)
        self.reported.discard(worker)
        return [CloseRound(deadline_passed=False)] if self.all_reported else []

    def tick(self, now: float) -> list[Decision]:
        """What the clock says at ``now``: open the gang, close the round, or wait until when."""
        if not self.gang_ready:
            deadline = (self.first_join if self.first_join is not None else now) + self.start_timeout_s
            if now >= deadline:
                return self._open_gang(now)
            return [Wait(deadline)]
        deadline = self.opened_at + self.round_deadline_s
        if now >= deadline:
            return [CloseRound(deadline_passed=True)]
        return [Wait(deadline)]

    def round_closed(self, now: float) -> None:
        """The job closed the open round: the next one opens now, nobody has reported it."""
        self.reported = set()
        self.opened_at = now

    def _open_gang(self, now: float) -> list[Decision]:
        if self.gang_ready:
            return []
        self.gang_ready = True
        self.opened_at = now
        decisions: list[Decision] = [GangOpened(len(self.members), self.replicas)]
        if self.reported and self.reported >= self.members:
            decisions.append(CloseRound(deadline_passed=False))
        return decisions


def async_round_closes(reports: int, replicas: int, round: int, total_rounds: int) -> bool:
    """Async: one job round is one report per replica (``reports`` since the last close), whoever sends
    them; the clock for evaluations and checkpoints, so the last round closes on the job's last exchange."""
    return reports >= replicas and round < total_rounds


def lapsed(last_seen: Mapping[str, float], now: float, lease_s: float) -> list[str]:
    """The members whose lease ran out: no call for ``lease_s`` seconds."""
    return [worker for worker, seen in last_seen.items() if seen < now - lease_s]
