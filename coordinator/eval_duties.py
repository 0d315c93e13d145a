"""Who evaluates which closed round, and which evaluation the job still waits for.

A round due for evaluation names one live worker as its evaluator; only that worker may report the
evaluation of that round, once (anyone else is refused: a joined client cannot write the job's results).
The job finishes only once the evaluation it waits for has come, or its evaluator has left. After a
coordinator restart an evaluation the previous coordinator still owed goes to the first worker taken
back. Bookkeeping only: the job calls it under its lock.
"""

from __future__ import annotations

from protos.messages import CoordinatorError

KEPT_DUTIES = 64  # duties of evaluators that died before reporting are forgotten past this many


class EvalDuties:
    def __init__(self) -> None:
        self.awaited: int | None = None  # the round whose evaluation the job waits for before it can finish
        self.evaluator: str | None = None  # the worker it waits for
        self._duties: dict[int, str] = {}  # round -> the worker told to evaluate it (its report is awaited)
        self._after_restart: int | None = None  # restored: this round's evaluation goes to the first rejoiner

    def assign(self, round: int, worker_id: str) -> None:
        self.awaited, self.evaluator = round, worker_id
        self._duties[round] = worker_id
        if len(self._duties) > KEPT_DUTIES:
            del self._duties[min(self._duties)]

    def require_awaited(self, round: int, worker_id: str) -> None:
        """FAILED_PRECONDITION unless ``worker_id`` was told to evaluate ``round`` and has not reported yet."""
        if self._duties.get(round) != worker_id:
            raise CoordinatorError("FAILED_PRECONDITION", f"no evaluation of round {round} is awaited from {worker_id}")

    def reported(self, round: int) -> None:
        """The (checked) evaluation of ``round`` came: that duty is done."""
        self._duties.pop(round, None)
        if self.awaited == round:
            self.awaited, self.evaluator = None, None

    def worker_left(self, worker_id: str) -> None:
        """An evaluator that left cannot hold the job up."""
        if self.evaluator == worker_id:
            self.awaited, self.evaluator = None, None

    def owe_after_restart(self, round: int) -> None:
        """The previous coordinator still owed the evaluation of ``round`` (not logged, or not exported)."""
        self._after_restart = self.awaited = round

    def take_over_after_restart(self, round: int, worker_id: str) -> bool:
        """``worker_id`` is the first worker taken back after a restart: it gets the evaluation of ``round``
        if that one is still owed. True when it did."""
        if self._after_restart != round:
            return False
        self.assign(round, worker_id)
        self._after_restart = None
        return True

    def drop_owed_after_restart(self) -> None:
        """The job starts without the replicas that never came back: an evaluation nobody took is dropped."""
        if self._after_restart is not None:
            self._after_restart = None
            if self.evaluator is None:
                self.awaited = None
