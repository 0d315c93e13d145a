"""One job's coordinator side: membership, the round clock, the center and the model, duties, checkpoints.

Two tensors matter (docs/algorithm.md). The *center* is what replicas are pulled toward: the mean of the
coupled averages mu_a (sync) or the EASGD center (async). The *model* is what the job hands back (evaluated,
exported, downloaded, checkpointed as ``reference``): the mean of the replicas' weights x_a after their
elastic step, gathered from the workers on the rounds that need it (evaluation, checkpoint, end); async,
the center itself.

Transport-agnostic and thread-safe: the in-process transport calls it from worker threads, the gRPC
server from its handler threads. When a round closes (gang, reports, leaves, leases, deadlines) is decided
by ``coordinator.rounds`` (pure, tested with made-up times); this class applies the decisions under its
lock. Every request is validated before it touches state, so a rejected
update never changes the center or the model. Events (rounds, evals, checkpoints, state changes) go to
``metrics.jsonl`` in the job directory and to listeners (progress bars, metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from torch import Tensor

from coordinator.checkpoint import (
    Checkpoint,
    pack_job_state,
    unpack_job_state,
)
from coordinator.eval_duties import EvalDuties
from coordinator.events import MetricsLog, read_events
from coordinator.job_events import (
    Evaluated,
    JobEvent,
    MemberChanged,
    Resumed,
    RoundClosed,
    StateChanged,
)
from coordinator.job_files import EXPORT_FILE, JobFiles
from coordinator.job_records import ClosedRound, JobState, Member
from coordinator.logtext import capped
from coordinator.model_gather import ModelGather
from coordinator.reference import SyncMean, count_nonfinite, easgd_center_step_
from coordinator.replica_check import check_replica_state
from coordinator.round_state import RoundState
from coordinator.rounds import CloseRound, Decision, GangOpened, SyncRounds, Wait, async_round_closes, lapsed
from coordinator.schedules import Schedule, first_values
from protos.messages import (
    CoordinatorError,
    Directives,
    EvalReport,
    ExchangeReply,
    JoinGrant,
    RoundStats,
    RoundValues,
)
from protos.spec import JobSpec

log = logging.getLogger(__name__)
Listener = Callable[[dict[str, Any]], None]


class Job:
    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        directory: Path,
        listeners: list[Listener] | None = None,
        resume: Checkpoint | None = None,
        train_size: int | None = None,
        *,
        round_state: RoundState | None = None,
        persist_rounds: bool = False,
    ) -> None:
        """``resume``: the latest checkpoint; ``round_state``: the round state a previous coordinator saved
        (round_state.py), newer than it. ``persist_rounds`` (the service): save the round state after every
        closed sync round, so that a restart resumes at the round the job was in."""
        self.job_id = job_id
        self.spec = spec
        # The schedule's unit is the training set's size, which comes from the data: known up front when the
        # runtime loaded it, from the checkpoint on resume, or from the first worker's report.
        self.schedule: Schedule | None = None
        self.train_size: int | None = None
        self.directory = Path(directory)
        self.files = JobFiles(job_id, self.directory, spec.checkpoint.keep, self._emit)
        self.store = self.files.store
        self.listeners = list(listeners or [])
        self.state = JobState.PENDING
        self.message = ""
        self._cond = threading.Condition()
        self._closing = False  # close(): the coordinator is stopping or has let go of the job
        self._finishing = False  # every duty is done: the reference is being written, then SUCCEEDED
        self._members: dict[str, Member] = {}
        self._next_worker = 0
        self._sum = SyncMean()
        self._stats: list[RoundStats] = []
        self._closed: dict[int, ClosedRound] = {}
        self._gather = ModelGather()
        self._evals = EvalDuties()
        self.last_train_loss: float | None = None
        self.last_test_error: float | None = None
        self._saved_states: dict[int, dict[str, Tensor]] = {}
        self._last_round_event: dict[str, Any] | None = None
        self.round = 0
        self.center: Tensor | None = None
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        # When a round closes (coordinator/rounds.py): the job applies the clock's decisions.
        self._rounds = SyncRounds(
            spec.replicas,
            spec.runtime.start_timeout_s,
            spec.optim.round_deadline_s,
            gang_ready=spec.optim.mode == "async",  # async replicas never wait for each other
            opened_at=self._started,
        )
        if resume is not None:
            self._restore(resume)
        resumed_from = "checkpoint" if resume is not None else None
        relog: dict[str, Any] | None = None
        if round_state is not None and round_state.round >= self.round and spec.optim.mode == "sync":
            relog = self._restore_round_state(round_state, resume)
            resumed_from = "round-state"
        if train_size is not None:
            if self.train_size is not None and train_size != self.train_size:
                raise CoordinatorError(
                    "FAILED_PRECONDITION",
                    f"the checkpoint was taken with {self.train_size} training samples, the data set now has "
                    f"{train_size}: resume with the same data",
                )
            self._learn_train_size(train_size, "the runtime")
        self.log = MetricsLog(self.directory / "metrics.jsonl", keep_below_round=self.round)
        if relog is not None:  # the crash came between saving the round state and logging its round
            self._publish(relog)
        if resumed_from is not None:
            checkpoint_round = resume.round if resume is not None else None
            self._emit(Resumed(self.round, resumed_from, checkpoint_round))
        # Sync replies wait until the round state naming the next round is on disk (_await_close).
        self._persist = persist_rounds and spec.optim.mode == "sync"
        self._durable_round = self.round

    # ----- helpers -------------------------------------------------------------------------------

    @property
    def model(self) -> Tensor | None:
        """What the job hands back: the mean of the replicas' x as of the last round that gathered it (async:
        the center's latest snapshot)."""
        return self._gather.model

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def _emit(self, event: JobEvent) -> None:
        self._publish(self._stamp(event))

    def _stamp(self, event: JobEvent) -> dict[str, Any]:
        return {"job": self.job_id, "time": round(self.elapsed(), 4), **event.as_record()}

    def _publish(self, event: dict[str, Any]) -> None:
        """Hand an event to the job's disk writer: it reaches ``metrics.jsonl`` and the listeners (the
        registry, watchers, progress bars) in order, never under the job's lock."""
        self.files.in_order(lambda: self._deliver(event))

    def _deliver(self, event: dict[str, Any]) -> None:
        self.log.write(event)
        for listener in self.listeners:
            listener(event)

    def _set_state(self, state: JobState, message: str = "") -> None:
        self.state, self.message = state, message
        self._emit(StateChanged(state.value, message, self.round))
        self._cond.notify_all()

    def _member(self, worker_id: str) -> Member:
        member = self._members.get(worker_id)
        if member is None:
            raise CoordinatorError("NOT_FOUND", f"unknown worker id {worker_id!r} in job {self.job_id}")
        member.last_seen = time.monotonic()
        return member

    def _require_running(self) -> None:
        if self._closing:
            raise CoordinatorError("UNAVAILABLE", f"job {self.job_id} is closed: the coordinator is stopping")
        if self.state.terminal:
            raise CoordinatorError(
                "FAILED_PRECONDITION", f"job {self.job_id} is {self.state.value}: {self.message}".rstrip(": ")
            )

    def _check_tensor(self, mu: Tensor, what: str = "coupled average", *, finite: bool = False) -> None:
        """Raise INVALID_ARGUMENT for a tensor that may not reach the center (``finite``: the caller has
        checked every value finite already, as the bytes arrived)."""
        if mu.dim() != 1 or not mu.is_floating_point():
            raise CoordinatorError(
                "INVALID_ARGUMENT",
                f"{what} must be a flat float tensor, got {mu.dtype} {list(mu.shape)}",
            )
        if self.center is not None and mu.numel() != self.center.numel():
            raise CoordinatorError(
                "INVALID_ARGUMENT",
                f"{what} has {mu.numel()} elements, the center has {self.center.numel()}",
            )
        if not finite and count_nonfinite(mu) > 0:
            raise CoordinatorError("INVALID_ARGUMENT", f"{what} contains NaN or Inf")

    def _values(self, k: int) -> RoundValues:
        if self.schedule is None:
            return first_values(self.spec.optim)  # round 0: nothing depends on the data set's size yet
        return self.schedule.values(k)

    def _learn_train_size(self, size: int, source: str) -> None:
        """Build the schedule from the first training-set size reported; a different size later fails the job
        (replicas must train on the same data set)."""
        if self.train_size is None:
            self.train_size = size
            self.schedule = Schedule(self.spec, size)
            log.info(
                "job %s: %d training samples (from %s): %d rounds",
                self.job_id,
                size,
                source,
                self.schedule.total_rounds,
            )
        elif size != self.train_size:
            self.abort(
                f"{source} has {size} training samples, the job's data set has {self.train_size}: "
                "every replica must load the same data set"
            )
            self._require_running()

    def _require_schedule(self) -> Schedule:
        if self.schedule is None:
            raise RuntimeError(f"job {self.job_id}: a round closed before any worker said how large its data set is")
        return self.schedule

    # ----- membership ----------------------------------------------------------------------------

    @property
    def rounds_done(self) -> bool:
        """Every round has closed (final duties such as the last eval may still be running)."""
        return self.schedule is not None and self.round >= self.schedule.total_rounds

    def join(
        self, name: str, device: str, want_replica: int | None = None, resume_round: int | None = None
    ) -> JoinGrant:
        """Make a member. ``resume_round``: the worker holds its replica's state at the start of that round
        (it lost its coordinator); it is taken back with it when it asks for its old replica and the round
        is this job's round or the one just closed (``_can_resume``), else it joins like anyone else."""
        with self._cond:
            self._require_running()
            if self.rounds_done and not (resume_round is not None and self._final_duties_owed()):
                raise CoordinatorError("FAILED_PRECONDITION", f"job {self.job_id} has run all its rounds")
            taken = {m.replica for m in self._members.values()}
            free = [r for r in range(self.spec.replicas) if r not in taken]
            if not free:
                raise CoordinatorError(
                    "RESOURCE_EXHAUSTED", f"job {self.job_id} already has all {self.spec.replicas} replicas"
                )
            replica = want_replica if want_replica in free else free[0]
            resume = resume_round is not None and replica == want_replica and self._can_resume(resume_round)
            worker_id = f"w{self._next_worker}"
            self._next_worker += 1
            member = Member(worker_id, name, replica, device, time.monotonic(), self.round)
            self._members[worker_id] = member
            saved = self._saved_states.pop(replica, None)
            if resume:
                saved = None  # the worker's own state is newer than the checkpoint's
                member.offer_round = resume_round
                if resume_round == self.round - 1:
                    member.rerun_round = resume_round
            else:
                self._owe_nothing_to(replica)
            # A newcomer starts from the model (async: the center, which is the model); before the first model
            # exists, from the center.
            latest = self.model if self.model is not None else self.center
            start = None if latest is None or saved is not None or resume else latest.clone()
            seed_center = self.spec.optim.mode == "async" and self.center is None
            duties = self._resume_duties(worker_id, resume_round) if resume else Directives()
            if self.state is JobState.PENDING:
                self._set_state(JobState.RUNNING)
            self._apply(self._rounds.join(worker_id, time.monotonic()))
            origin = (
                "offer"
                if resume
                else "checkpoint"
                if saved is not None
                else "reference"
                if start is not None
                else "fresh"
            )
            self._emit(MemberChanged("join", replica, len(self._members), start=origin))
            log.info(
                "job %s: %s joined as replica %d (%s, %s)", self.job_id, capped(name), replica, capped(device), origin
            )
            return JoinGrant(
                worker_id=worker_id,
                job_id=self.job_id,
                replica=replica,
                spec=self.spec,
                values=self._values(resume_round if resume and resume_round is not None else self.round),
                start=start,
                replica_state=saved,
                seed_center=seed_center,
                resume=resume,
                resume_duties=duties,
            )

    def _can_resume(self, round: int) -> bool:
        """Sync only: a worker at this round has applied every closed round's center; one at the round just
        closed lost that round's reply and runs it again (the same chain: its state holds its random
        streams) to be handed the closed round's center. Async replicas move on their own clocks: they
        rejoin from the model."""
        if self.spec.optim.mode != "sync":
            return False
        return round == self.round or (round == self.round - 1 and round in self._closed)

    def _final_duties_owed(self) -> bool:
        return self._gather.pending is not None or self._evals.awaited is not None

    def _owe_nothing_to(self, replica: int) -> None:
        """A replica that comes back without its own state (its worker died with the coordinator) cannot
        upload the x of a round it did not run: the model being gathered is the mean of the others'."""
        if self._gather.excuse(replica, before_round=self.round):
            self._finish_model()

    def _resume_duties(self, worker_id: str, resume_round: int | None) -> Directives:
        """A worker taken back at the coordinator's round owes the duties of the round closed just before
        that a restart lost (its offer covers the model's x and the checkpoint's state); an evaluation of
        that round still owed goes to the first worker taken back."""
        k = self.round - 1
        closed = self._closed.get(k)
        if closed is None:
            return Directives()
        if closed.evaluator is None and self._evals.take_over_after_restart(k, worker_id):
            closed.evaluator = worker_id
        if resume_round != self.round:  # it runs round k again: its exchange reply carries the duties
            return Directives()
        evaluate = closed.evaluator == worker_id
        return Directives(evaluate=evaluate, export=evaluate and closed.stop, stop=closed.stop)

    def _apply(self, decisions: list[Decision]) -> None:
        """Carry out the round clock's decisions (coordinator/rounds.py), in order."""
        for decision in decisions:
            if isinstance(decision, GangOpened):
                self._gang_opened(decision)
            elif isinstance(decision, CloseRound):
                if decision.deadline_passed:
                    log.warning("job %s: round %d deadline passed, closing on who reported", self.job_id, self.round)
                self._close_round()
        self._cond.notify_all()

    def _gang_opened(self, gang: GangOpened) -> None:
        if not gang.short:
            return
        log.warning("job %s: starting with %d of %d replicas", self.job_id, gang.members, gang.replicas)
        # After a restart: replicas that did not come back owe nothing, an eval nobody took is dropped.
        for replica in set(range(self.spec.replicas)) - {m.replica for m in self._members.values()}:
            self._owe_nothing_to(replica)
        self._evals.drop_owed_after_restart()

    def open_gang_if_due(self) -> None:
        """Start without the replicas still missing once ``runtime.start_timeout_s`` has passed since the
        first join, even while no worker waits on a round to ask: after a restart that came after the last
        round, the workers taken back only gather the last model, and one that had already exited never
        comes back. The job manager's reaper calls this."""
        with self._cond:
            if self.state.terminal or self._rounds.gang_ready or self._rounds.first_join is None:
                return
            decisions = self._rounds.tick(time.monotonic())
            if not isinstance(decisions[-1], Wait):
                self._apply(decisions)

    def heartbeat(self, worker_id: str) -> bool:
        with self._cond:
            self._member(worker_id)
            return not self.state.terminal

    def leave(self, worker_id: str, why: str = "leave") -> None:
        with self._cond:
            self._drop(worker_id, why)

    def expire(self, lease_s: float) -> list[str]:
        """Drop the members whose lease lapsed (no call for ``lease_s`` seconds); returns their ids."""
        with self._cond:
            seen = {worker_id: member.last_seen for worker_id, member in self._members.items()}
            out = lapsed(seen, time.monotonic(), lease_s)
            for worker_id in out:
                log.warning("job %s: worker %s missed its lease (%.0fs): dropping it", self.job_id, worker_id, lease_s)
                self._drop(worker_id, "lapse")
            return out

    def _drop(self, worker_id: str, why: str) -> None:
        member = self._members.pop(worker_id, None)
        if member is None:
            return
        # The round closes on the live members: the one leaving may be the one everyone waited for.
        decisions = self._rounds.leave(worker_id, time.monotonic())
        self._emit(MemberChanged(why, member.replica, len(self._members)))
        if self.state.terminal:
            return
        # Duties the member can no longer do must not hold the job up.
        if self._gather.excuse(member.replica):
            self._finish_model()
        self._evals.worker_left(worker_id)
        if self.spec.optim.mode == "sync":
            self._apply(decisions)
        self._maybe_finish()
        self._cond.notify_all()

    def check_member(self, worker_id: str) -> None:
        """NOT_FOUND unless ``worker_id`` is a member (and renew its lease)."""
        with self._cond:
            self._member(worker_id)

    def fail(self, worker_id: str, reason: str) -> None:
        """A member reports that the job cannot go on (e.g. its loss became NaN)."""
        with self._cond:
            self._member(worker_id)
            self.abort(reason)

    def abort(self, reason: str) -> None:
        """Fail the job from the coordinator's side (a runtime noticed that it cannot finish)."""
        with self._cond:
            if not self.state.terminal:
                log.error("job %s failed: %s", self.job_id, capped(reason))
                self._set_state(JobState.FAILED, reason)

    def cancel(self) -> None:
        with self._cond:
            if not self.state.terminal:
                self._set_state(JobState.CANCELLED, "cancelled by user")

    @property
    def live_workers(self) -> int:
        return len(self._members)

    def wait(self, timeout: float | None = None) -> JobState:
        with self._cond:
            self._cond.wait_for(lambda: self.state.terminal, timeout)
            return self.state

    # ----- rounds --------------------------------------------------------------------------------

    def exchange(
        self, worker_id: str, round: int, mu: Tensor, stats: RoundStats, timeout: float | None = None
    ) -> ExchangeReply:
        """Report a coupled average and wait for the round's center (sync) or get it at once (async)."""
        early = self.report(worker_id, round, mu, stats)
        return early if early is not None else self.await_round(worker_id, round, timeout)

    def report(
        self,
        worker_id: str,
        round: int,
        mu: Tensor,
        stats: RoundStats,
        *,
        finite: bool = False,
        donated: bool = False,
    ) -> ExchangeReply | None:
        """Validate and add a coupled average (async: the replica's x after its local step); the caller may
        drop ``mu`` afterwards, so waiting workers hold no model-sized memory. Async rounds reply at once.
        ``finite``: the caller has checked every value finite (the data channel does, as the bytes arrive).
        ``donated``: the caller will never write ``mu``'s memory again, so the round may keep it instead of
        copying it (a round's first report: reference.py's ``SyncMean``)."""
        with self._cond:
            self._require_running()
            member = self._member(worker_id)
            self._check_tensor(mu, finite=finite)
            if stats.train_size > 0:
                self._learn_train_size(stats.train_size, f"replica {member.replica}")
            elif self.schedule is None:
                raise CoordinatorError(
                    "INVALID_ARGUMENT", "train_size is missing: the job's schedule needs the training set's size"
                )
            if self.spec.optim.mode == "async":
                return self._exchange_async(member, round, mu, stats)
            if member.rerun_round == round and round == self.round - 1 and round in self._closed:
                # Taken back at the round just closed: it ran that round again for the reply it lost.
                member.rerun_round = None
                return self._reply(worker_id, member.replica, round) if self._durable(round) else None
            reported = self._rounds.reported
            if round != self.round or worker_id in reported:
                what = "stale" if round < self.round or worker_id in reported else "future"
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"{what} round {round}: job {self.job_id} is in round {self.round}"
                )
            self._sum.add(mu, donated=donated)
            self._stats.append(stats)
            self._apply(self._rounds.report(worker_id, time.monotonic()))
            return None

    def await_round(
        self, worker_id: str, round: int, timeout: float | None = None, *, durable: bool = True
    ) -> ExchangeReply:
        """``durable=False``: as soon as the round has closed, maybe before its round state is on disk; the
        caller may then send the reply's bytes but must not let the worker act on them before
        ``await_durable(round)`` returns (the data channel's COMMIT: the write overlaps the download)."""
        with self._cond:
            return self._await_close(worker_id, round, timeout, durable)

    def await_durable(self, round: int, timeout: float | None = None) -> None:
        """Wait, as ``await_round`` does, until the round state naming the round after ``round`` is on disk."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._durable(round):
                self._require_running()
                now = time.monotonic()
                if give_up is not None and now >= give_up:
                    raise CoordinatorError("DEADLINE_EXCEEDED", f"round {round} was not saved in {timeout}s")
                self._cond.wait(None if give_up is None else give_up - now)

    def _await_close(self, worker_id: str, round: int, timeout: float | None, durable: bool = True) -> ExchangeReply:
        give_up = None if timeout is None else time.monotonic() + timeout
        while round not in self._closed or (durable and not self._durable(round)):
            self._require_running()
            now = time.monotonic()
            if give_up is not None and now >= give_up:
                raise CoordinatorError("DEADLINE_EXCEEDED", f"round {round} did not close in {timeout}s")
            if round in self._closed:  # closed: its round state is being written (round_state.py)
                self._cond.wait(None if give_up is None else give_up - now)
                continue
            decisions = self._rounds.tick(now)
            wait = decisions[-1]
            if not isinstance(wait, Wait):  # the gang opened or the round closed: look again
                self._apply(decisions)
                continue
            self._cond.wait(min(wait.until, give_up or wait.until) - now)
        member = self._members.get(worker_id)  # a member dropped while it waited still hears how the round ended
        return self._reply(worker_id, member.replica if member is not None else None, round)

    def _durable(self, round: int) -> bool:
        """The round state naming the round after ``round`` is on disk (always, when rounds are not saved)."""
        return not self._persist or self._durable_round > round

    def _reply(self, worker_id: str, replica: int | None, round: int) -> ExchangeReply:
        """A closed round's result for one member, with its duties: it uploads its x (or its whole state) only
        while the round's model still lacks its replica's."""
        closed = self._closed[round]
        owes = self._gather.owes(round, replica)
        evaluate = closed.evaluator == worker_id
        directives = Directives(
            evaluate=evaluate,
            export=evaluate and closed.stop,
            checkpoint=closed.checkpoint and owes,
            stop=closed.stop,
            model=closed.model and owes,
        )
        return ExchangeReply(round, closed.reference, closed.next_values, directives)

    def _close_round(self, evaluator_hint: str | None = None) -> ClosedRound:
        schedule = self._require_schedule()
        k = self.round
        workers = self._sum.count
        center, consensus = self._sum.finish()
        live = sorted(self._members.values(), key=lambda m: m.replica)
        evaluator = None
        if live and schedule.eval_due(k):
            evaluator = evaluator_hint or live[0].worker_id
        checkpoint = schedule.checkpoint_due(k)
        stop = schedule.is_last(k)
        sync = self.spec.optim.mode == "sync"
        # Sync: the model is the mean of the replicas' x after this round's elastic step, which only the
        # workers hold: they upload it when it is needed. Async: the center is the model.
        gather = sync and schedule.model_due(k)
        closed = ClosedRound(center, schedule.values(k + 1), evaluator, checkpoint, stop, gather)
        self._closed[k] = closed
        self._closed.pop(k - 2, None)
        values = schedule.values(k)
        losses = [s.train_loss for s in self._stats]
        now = time.monotonic()
        event = self._stamp(
            RoundClosed(
                round=k,
                epoch=schedule.epoch(k + 1),
                gamma=values.gamma,
                rho=values.rho,
                lr=values.lr,
                train_loss=sum(losses) / len(losses),
                consensus_distance=consensus,
                workers=workers,
                round_seconds=now - self._rounds.opened_at,
                chain_seconds=max(s.chain_seconds for s in self._stats),
            )
        )
        self._last_round_event = event
        if not self._persist:
            self._publish(event)  # else once the round state is on disk: the log never runs ahead of it
        self.center = center
        if not sync:  # a snapshot: the live center moves on with every exchange
            self._gather.adopt(center.clone(), k, keep=True)
        if gather:
            if self._gather.open(k, center, {m.replica for m in live}, checkpoint):
                self._finish_model()  # nobody left to upload
        elif checkpoint:  # async replicas never stand still together: the checkpoint holds the center
            self._write_checkpoint(k + 1, {})
        if evaluator is not None:
            self._evals.assign(k, evaluator)
        self.last_train_loss = sum(losses) / len(losses)
        self.round = k + 1
        self._sum.reset()  # keeps the sum's buffer for the next round
        self._stats = []
        self._rounds.round_closed(now)
        self._save_round_state(new_round=True)
        self._cond.notify_all()
        self._maybe_finish()
        return closed

    def _exchange_async(self, member: Member, round: int, x: Tensor, stats: RoundStats) -> ExchangeReply:
        schedule = self._require_schedule()
        if round != member.round:
            raise CoordinatorError("FAILED_PRECONDITION", f"worker {member.worker_id} is in round {member.round}")
        if self.center is None:
            raise CoordinatorError("FAILED_PRECONDITION", f"job {self.job_id} has no center yet: report the start")
        center_before = easgd_center_step_(self.center, x, self.spec.optim.alpha)
        member.round += 1
        self._stats.append(stats)
        evaluate = False
        if async_round_closes(len(self._stats), self.spec.replicas, self.round, schedule.total_rounds):
            self._sum.add(self.center)
            closed = self._close_round(evaluator_hint=member.worker_id)
            evaluate = closed.evaluator == member.worker_id
        stop = schedule.is_last(round) or self.state.terminal
        directives = Directives(evaluate=evaluate, export=evaluate and stop, stop=stop)
        # An eval duty names the job round it evaluates, which is what report_eval will quote back.
        closed_round = self.round - 1 if evaluate else round
        return ExchangeReply(closed_round, center_before, schedule.values(round + 1), directives)

    # ----- duties --------------------------------------------------------------------------------

    def report_eval(self, worker_id: str, report: EvalReport) -> None:
        with self._cond:
            self._member(worker_id)
            # Only the worker told to evaluate a round reports it, once; the model only with the last one.
            self._evals.require_awaited(report.round, worker_id)
            if report.model_state is not None and not (self.schedule and self.schedule.is_last(report.round)):
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"the model is exported after the last round, not round {report.round}"
                )
            self._evals.reported(report.round)
            if "test" in report.results:
                self.last_test_error = report.results["test"][1]
            for split, (loss, error) in report.results.items():
                self._emit(Evaluated(report.round, report.epoch, split, loss, error))
            if report.model_state is not None:
                self.files.export(report.model_state, failed=self.abort)
            self._maybe_finish()

    def report_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None:
        """A replica's weights x after the elastic step of closed round ``round`` (its whole state on checkpoint
        rounds); async, before round 0, the shared start that becomes the center."""
        with self._cond:
            member = self._member(worker_id)
            what = f"replica state from {worker_id} (replica {member.replica}, round {round})"
            self._check_state(state, what, whole=False)
            x = state["x"]
            self._check_tensor(x, f"replica {member.replica}'s weights x")
            if self.spec.optim.mode == "async":  # the shared start; a second replica's copy of it is moot
                if self.center is None:
                    self.center = x.detach().reshape(-1).clone()
                    self._gather.adopt(self.center.clone())
                return
            pending = self._gather.pending
            if pending is None or not self._gather.owes(round, member.replica):
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"no model is being gathered from {worker_id} at round {round}"
                )
            if pending.checkpoint:
                self._check_state(state, f"{what} at a checkpoint", whole=True)
            self._add_to_model(member.replica, state)
            self._maybe_finish()

    def _check_state(self, state: dict[str, Tensor], what: str, *, whole: bool) -> None:
        model = self.center if self.center is not None else self.model
        elements, dtype = (None, None) if model is None else (model.numel(), model.dtype)
        check_replica_state(state, elements, dtype, whole=whole, what=what)

    def _add_to_model(self, replica: int, state: dict[str, Tensor]) -> None:
        if self._gather.add(replica, state):
            self._finish_model()

    def offer_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None:
        """The whole state, at the start of ``round``, of a worker taken back with it (join with
        ``resume_round``). At the job's round it is the state after the elastic step of the round before:
        what that round's model (and checkpoint) still lacks from this replica, if anything."""
        with self._cond:
            self._require_running()
            member = self._member(worker_id)
            if member.offer_round != round:
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"no replica state offer at round {round} is awaited from {worker_id}"
                )
            what = f"replica state offered by {worker_id} (replica {member.replica}, round {round})"
            self._check_state(state, what, whole=True)
            self._check_tensor(state["x"], f"{what}: x")
            member.offer_round = None
            if round < self.round:
                return  # it runs the round just closed again; its exchange reply says what it owes
            if self._gather.owes(round - 1, member.replica):
                self._add_to_model(member.replica, state)
            self._maybe_finish()

    def _finish_model(self) -> None:
        """The model being gathered is complete: it is kept for its evaluators; checkpoint if due."""
        pending = self._gather.finish()
        if pending.checkpoint:
            self._write_checkpoint(pending.round + 1, pending.states, pending.center)
        self._save_round_state(new_round=False)
        self._cond.notify_all()

    def _save_round_state(self, new_round: bool) -> None:
        """Hand the round, the center and the model to the disk writer (the tensors are not changed in
        place in sync mode, the writer reads them as they are)."""
        if not self._persist or self.center is None:
            return
        state = RoundState(
            round=self.round,
            center=self.center,
            model=self.model if self.model is not None else self.center,
            model_round=self._gather.round,
            elapsed=self.elapsed(),
            train_size=self.train_size,
            round_event=self._last_round_event,
        )
        self.files.round_state(state, then=lambda state: self._round_state_written(state, new_round))

    def _round_state_written(self, state: RoundState, new_round: bool) -> None:
        """On the disk writer, without the lock: log the round, then release its waiters."""
        if new_round and state.round_event is not None:
            self._deliver(state.round_event)
        with self._cond:
            self._durable_round = max(self._durable_round, state.round)
            self._cond.notify_all()

    def fetch_model(self, worker_id: str, round: int, timeout: float | None = None) -> Tensor:
        """The model of closed round ``round`` once every replica has uploaded its x (the evaluator's input)."""
        with self._cond:
            self._member(worker_id)
            give_up = None if timeout is None else time.monotonic() + timeout
            while (model := self._gather.kept(round)) is None:
                self._require_running()
                if round < self.round and not self._gather.gathering(round):
                    raise CoordinatorError("FAILED_PRECONDITION", f"the model of round {round} is not kept")
                remaining = None if give_up is None else give_up - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CoordinatorError(
                        "DEADLINE_EXCEEDED", f"the model of round {round} was not complete in {timeout}s"
                    )
                self._cond.wait(remaining)
            return model

    def _live_tensor(self, tensor: Tensor) -> Tensor:
        """What the disk writer may read later: async, the center moves in place with every exchange."""
        return tensor.clone() if self.spec.optim.mode == "async" and tensor is self.center else tensor

    def _write_checkpoint(
        self, round: int, states: dict[int, dict[str, Tensor]], center: Tensor | None = None
    ) -> Future[Path | None]:
        """Hand a checkpoint at ``round`` (the next round to run) to the disk writer: the model, the center,
        the replicas' states. Its result is None when it could not be written (logged, a
        ``checkpoint_failed`` event; the previous one is kept)."""
        center = self.center if center is None else center
        assert center is not None, "a checkpoint before the first center"
        center = self._live_tensor(center)
        model = self._live_tensor(self.model) if self.model is not None else center
        tensors = pack_job_state(model, center, states)  # shared memory is written from a copy (checkpoint.py)
        meta = {
            "job": self.job_id,
            "elapsed": self.elapsed(),
            "spec": self.spec.to_dict(),
            "train_size": self.train_size,
            "values": self._values(round).__dict__,
        }
        return self.files.checkpoint(round, tensors, meta)

    def checkpoint_now(self, timeout: float = 60.0) -> Path | None:
        """A checkpoint of the model and center alone, right away (e.g. on ``ray job stop``), once it is on
        disk: a resume from it restarts the replicas from the model."""
        with self._cond:
            if self.center is None:
                return None
            written = self._write_checkpoint(self.round, {})
        return written.result(timeout)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Return once every event, checkpoint, round state and model file due so far is written."""
        self.files.flush(timeout)

    def close(self) -> None:
        """Let go of the job (the coordinator stops, or released it after it finished): calls waiting on a
        round or a model wake up and answer UNAVAILABLE, later calls too; the metrics log is closed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.files.close()  # what is queued is written; those writes take the lock: not held here
        with self._cond:
            self.log.close()

    def drop_replica(self, replica: int, why: str = "lost") -> None:
        """Drop the member serving ``replica`` (its runtime saw it die)."""
        with self._cond:
            for worker_id, member in list(self._members.items()):
                if member.replica == replica:
                    self._drop(worker_id, why)

    def _maybe_finish(self) -> None:
        """Every round closed and every duty done: write the reference after whatever the disk writer still
        holds (the last checkpoint, the exported model), then the job has SUCCEEDED."""
        if self._finishing or not self.rounds_done or self.state.terminal:
            return
        if self._evals.awaited is not None or self._gather.pending is not None:
            return
        self._finishing = True
        reference = None
        if self.center is not None:
            center = self._live_tensor(self.center)
            model = self._live_tensor(self.model) if self.model is not None else center.clone()
            reference = {"reference": model, "center": center}
        self.files.reference(reference, failed=self.abort, then=self._succeeded)

    def _succeeded(self) -> None:
        """On the disk writer: the reference (and everything before it) is on disk."""
        with self._cond:
            if not self.state.terminal:
                self._set_state(JobState.SUCCEEDED)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.round = ckpt.round
        model, self.center, self._saved_states = unpack_job_state(ckpt.tensors)
        self._gather.adopt(model)
        size = ckpt.meta.get("train_size")
        if isinstance(size, int):
            self._learn_train_size(size, "the checkpoint")
        self._elapsed_before = float(ckpt.meta.get("elapsed", 0.0))
        log.info("job %s: resuming at round %d from %s", self.job_id, self.round, ckpt.path)

    def _restore_round_state(self, saved: RoundState, ckpt: Checkpoint | None) -> dict[str, Any] | None:
        """Resume at the round the previous coordinator was in (sync). The round just closed is rebuilt from
        the schedule: its center answers workers that run it again, and what it still owed (its model, its
        checkpoint, its evaluation) is gathered from the workers that come back. Returns the round's event
        if the log lacks it (the crash came between saving and logging)."""
        checkpoint_round = ckpt.round if ckpt is not None else 0
        # Saved after the checkpoint of the same round (if any), so its model is at least as new.
        self.round, self.center = saved.round, saved.center
        self._gather.adopt(saved.model, saved.model_round, keep=saved.model_round == saved.round - 1)
        if saved.train_size is not None:
            self._learn_train_size(saved.train_size, "the round state")
        self._elapsed_before = max(self._elapsed_before, saved.elapsed)
        log.info("job %s: resuming at round %d from its round state", self.job_id, self.round)
        k = self.round - 1
        schedule = self.schedule
        if k < 0 or schedule is None:
            return None
        needs_model = schedule.model_due(k) and self._gather.round < k
        needs_checkpoint = schedule.checkpoint_due(k) and checkpoint_round < self.round
        self._closed[k] = ClosedRound(
            saved.center, schedule.values(self.round), None, needs_checkpoint, schedule.is_last(k), needs_model
        )
        if needs_model:
            replicas = set(range(self.spec.replicas))
            self._gather.open(k, saved.center, replicas, needs_checkpoint and needs_model)
        logged = read_events(self.directory / "metrics.jsonl")
        evaluated = any(e.get("kind") == "eval" and e.get("round") == k for e in logged)
        exported = not schedule.is_last(k) or (self.directory / EXPORT_FILE).is_file()
        if schedule.eval_due(k) and not (evaluated and exported):
            self._evals.owe_after_restart(k)
        if any(e.get("kind") == "round" and e.get("round") == k for e in logged):
            return None
        self._last_round_event = saved.round_event
        return saved.round_event
