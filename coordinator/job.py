"""One job's coordinator side: membership, the round clock, the center and the model, duties, checkpoints.

Two tensors matter (docs/algorithm.md). The *center* is what replicas are pulled toward: the mean of the
coupled averages mu_a (sync) or the EASGD center (async). The *model* is what the job hands back (evaluated,
exported, downloaded, checkpointed as ``reference``): the mean of the replicas' weights x_a after their
elastic step, gathered from the workers on the rounds that need it (evaluation, checkpoint, end); async,
the center itself.

Transport-agnostic and thread-safe: the in-process transport calls it from worker threads, the gRPC
server from its handler threads. Every request is validated before it touches state, so a rejected
update never changes the center or the model. Events (rounds, evals, checkpoints, state changes) go to
``metrics.jsonl`` in the job directory and to listeners (progress bars, metrics).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coordinator.checkpoint import Checkpoint, CheckpointStore, pack_job_state, unpack_job_state
from coordinator.events import MetricsLog, save_tensors
from coordinator.job_records import ClosedRound, JobState, Member, PendingModel
from coordinator.reference import SyncMean, easgd_center_step_, squared_norm
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
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        # The schedule's unit is the training set's size, which comes from the data: known up front when the
        # runtime loaded it, from the checkpoint on resume, or from the first worker's report.
        self.schedule: Schedule | None = None
        self.train_size: int | None = None
        self.directory = Path(directory)
        self.store = CheckpointStore(self.directory / "checkpoints", keep=spec.checkpoint.keep)
        self.listeners = list(listeners or [])
        self.state = JobState.PENDING
        self.message = ""
        self._cond = threading.Condition()
        self._closing = False  # close(): the coordinator is stopping or has let go of the job
        self._members: dict[str, Member] = {}
        self._next_worker = 0
        self._sum = SyncMean()
        self._reported: set[str] = set()
        self._stats: list[RoundStats] = []
        self._closed: dict[int, ClosedRound] = {}
        self._pending: PendingModel | None = None
        self._models: dict[int, Tensor] = {}  # closed round -> model, for evaluators still fetching
        self._awaiting_eval: int | None = None
        self._evaluator: str | None = None
        self._eval_duties: dict[int, str] = {}  # round -> the worker told to evaluate it (its report is awaited)
        self.last_train_loss: float | None = None
        self.last_test_error: float | None = None
        self._saved_states: dict[int, dict[str, Tensor]] = {}
        self.round = 0
        self.center: Tensor | None = None
        self.model: Tensor | None = None
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        self._round_opened = self._started
        # Sync rounds wait until every requested replica has joined (or start_timeout_s passed), so that
        # the first rounds are not closed by whichever worker happened to start first.
        self._gang_ready = spec.optim.mode == "async"
        self._first_join: float | None = None
        if resume is not None:
            self._restore(resume)
        if train_size is not None:
            if self.train_size is not None and train_size != self.train_size:
                raise CoordinatorError(
                    "FAILED_PRECONDITION",
                    f"the checkpoint was taken with {self.train_size} training samples, the data set now has "
                    f"{train_size}: resume with the same data",
                )
            self._learn_train_size(train_size, "the runtime")
        self.log = MetricsLog(self.directory / "metrics.jsonl", keep_below_round=self.round)

    # ----- helpers -------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    def _emit(self, event: dict[str, Any]) -> None:
        event = {"job": self.job_id, "time": round(self.elapsed(), 4), **event}
        self.log.write(event)
        for listener in self.listeners:
            listener(event)

    def _set_state(self, state: JobState, message: str = "") -> None:
        self.state, self.message = state, message
        self._emit({"kind": "state", "state": state.value, "message": message, "round": self.round})
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

    def _check_tensor(self, mu: Tensor, what: str = "coupled average", sq_norm: float | None = None) -> float | None:
        """Raise INVALID_ARGUMENT for a tensor that may not reach the center; returns ``squared_norm(mu)`` (its
        pass is the finite check; ``sq_norm``: the caller computed it as the bytes arrived), or None when
        that overflowed for finite float64 values."""
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
        sq = squared_norm(mu) if sq_norm is None else sq_norm
        if math.isfinite(sq):
            return sq
        if not bool(torch.isfinite(mu).all()):
            raise CoordinatorError("INVALID_ARGUMENT", f"{what} contains NaN or Inf")
        return None

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

    def join(self, name: str, device: str, want_replica: int | None = None) -> JoinGrant:
        with self._cond:
            self._require_running()
            if self.rounds_done:
                raise CoordinatorError("FAILED_PRECONDITION", f"job {self.job_id} has run all its rounds")
            taken = {m.replica for m in self._members.values()}
            free = [r for r in range(self.spec.replicas) if r not in taken]
            if not free:
                raise CoordinatorError(
                    "RESOURCE_EXHAUSTED", f"job {self.job_id} already has all {self.spec.replicas} replicas"
                )
            replica = want_replica if want_replica in free else free[0]
            worker_id = f"w{self._next_worker}"
            self._next_worker += 1
            self._members[worker_id] = Member(worker_id, name, replica, device, time.monotonic(), self.round)
            saved = self._saved_states.pop(replica, None)
            # A newcomer starts from the model (async: the center, which is the model); before the first model
            # exists, from the center.
            latest = self.model if self.model is not None else self.center
            start = None if latest is None or saved is not None else latest.clone()
            seed_center = self.spec.optim.mode == "async" and self.center is None
            if self.state is JobState.PENDING:
                self._set_state(JobState.RUNNING)
            if self._first_join is None:
                self._first_join = time.monotonic()
            if len(self._members) >= self.spec.replicas:
                self._open_gang()
            origin = "checkpoint" if saved is not None else "reference" if start is not None else "fresh"
            self._emit(
                {"kind": "member", "event": "join", "replica": replica, "workers": len(self._members), "start": origin}
            )
            log.info("job %s: %s joined as replica %d (%s)", self.job_id, name, replica, device)
            return JoinGrant(
                worker_id=worker_id,
                job_id=self.job_id,
                replica=replica,
                spec=self.spec,
                values=self._values(self.round),
                start=start,
                replica_state=saved,
                seed_center=seed_center,
            )

    def _open_gang(self) -> None:
        if self._gang_ready:
            return
        self._gang_ready = True
        self._round_opened = time.monotonic()
        if len(self._members) < self.spec.replicas:
            log.warning("job %s: starting with %d of %d replicas", self.job_id, len(self._members), self.spec.replicas)
        if self._reported and self._reported >= set(self._members):
            self._close_round()
        self._cond.notify_all()

    def _all_reported(self) -> bool:
        return self._gang_ready and bool(self._members) and self._reported >= set(self._members)

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
            cutoff = time.monotonic() - lease_s
            lapsed = [w for w, m in self._members.items() if m.last_seen < cutoff]
            for worker_id in lapsed:
                log.warning("job %s: worker %s missed its lease (%.0fs): dropping it", self.job_id, worker_id, lease_s)
                self._drop(worker_id, "lapse")
            return lapsed

    def _drop(self, worker_id: str, why: str) -> None:
        member = self._members.pop(worker_id, None)
        if member is None:
            return
        self._emit({"kind": "member", "event": why, "replica": member.replica, "workers": len(self._members)})
        if self.state.terminal:
            return
        # Duties the member can no longer do must not hold the job up.
        pending = self._pending
        if pending is not None and member.replica not in pending.reported:
            pending.expected.discard(member.replica)
            if pending.complete:
                self._finish_model(pending)
        if self._evaluator == worker_id:
            self._awaiting_eval, self._evaluator = None, None
        self._reported.discard(worker_id)
        # The round closes on the live members: the one leaving may be the one everyone waited for.
        if self.spec.optim.mode == "sync" and self._all_reported():
            self._close_round()
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
                log.error("job %s failed: %s", self.job_id, reason)
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
        self, worker_id: str, round: int, mu: Tensor, stats: RoundStats, *, sq_norm: float | None = None
    ) -> ExchangeReply | None:
        """Validate and add a coupled average (async: the replica's x after its local step); the caller may
        drop ``mu`` afterwards (the sum keeps no reference to it), so waiting workers hold no model-sized
        memory. Async rounds reply at once. ``sq_norm``: ``squared_norm(mu)``, from a caller that computed it
        (and so checked ``mu`` finite) while receiving it."""
        with self._cond:
            self._require_running()
            member = self._member(worker_id)
            sq_norm = self._check_tensor(mu, sq_norm=sq_norm)
            if stats.train_size > 0:
                self._learn_train_size(stats.train_size, f"replica {member.replica}")
            elif self.schedule is None:
                raise CoordinatorError(
                    "INVALID_ARGUMENT", "train_size is missing: the job's schedule needs the training set's size"
                )
            if self.spec.optim.mode == "async":
                return self._exchange_async(member, round, mu, stats)
            if round != self.round or worker_id in self._reported:
                what = "stale" if round < self.round or worker_id in self._reported else "future"
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"{what} round {round}: job {self.job_id} is in round {self.round}"
                )
            self._sum.add(mu, sq_norm)
            self._reported.add(worker_id)
            self._stats.append(stats)
            if self._all_reported():
                self._close_round()
            return None

    def await_round(self, worker_id: str, round: int, timeout: float | None = None) -> ExchangeReply:
        with self._cond:
            return self._await_close(worker_id, round, timeout)

    def _await_close(self, worker_id: str, round: int, timeout: float | None) -> ExchangeReply:
        give_up = None if timeout is None else time.monotonic() + timeout
        while round not in self._closed:
            self._require_running()
            now = time.monotonic()
            if not self._gang_ready:
                deadline = (self._first_join or now) + self.spec.runtime.start_timeout_s
                if now >= deadline:
                    self._open_gang()
                    continue
            else:
                deadline = self._round_opened + self.spec.optim.round_deadline_s
            if now >= deadline:
                log.warning("job %s: round %d deadline passed, closing on who reported", self.job_id, round)
                self._close_round()
                break
            if give_up is not None and now >= give_up:
                raise CoordinatorError("DEADLINE_EXCEEDED", f"round {round} did not close in {timeout}s")
            self._cond.wait(min(deadline, give_up or deadline) - now)
        closed = self._closed[round]
        evaluate = closed.evaluator == worker_id
        directives = Directives(
            evaluate=evaluate,
            export=evaluate and closed.stop,
            checkpoint=closed.checkpoint,
            stop=closed.stop,
            model=closed.model,
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
        self._emit(
            {
                "kind": "round",
                "round": k,
                "epoch": schedule.epoch(k + 1),
                "gamma": values.gamma,
                "rho": values.rho,
                "lr": values.lr,
                "train_loss": sum(losses) / len(losses),
                "consensus_distance": consensus,
                "workers": workers,
                "round_seconds": now - self._round_opened,
                "chain_seconds": max(s.chain_seconds for s in self._stats),
            }
        )
        self.center = center
        if not sync:  # a snapshot: the live center moves on with every exchange
            self.model = center.clone()
            self._models = {k: self.model}
        if gather:
            self._pending = PendingModel(k, center, {m.replica for m in live}, checkpoint)
            if self._pending.complete:  # nobody left to upload
                self._finish_model(self._pending)
        elif checkpoint:  # async replicas never stand still together: the checkpoint holds the center
            self._write_checkpoint(k + 1, {})
        if evaluator is not None:
            self._awaiting_eval, self._evaluator = k, evaluator
            self._eval_duties[k] = evaluator
            if len(self._eval_duties) > 64:  # duties of workers that died before reporting
                del self._eval_duties[min(self._eval_duties)]
        self.last_train_loss = sum(losses) / len(losses)
        self.round = k + 1
        self._sum.reset()  # keeps the sum's buffer for the next round
        self._reported = set()
        self._stats = []
        self._round_opened = now
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
        # One job round = one report per replica (n reports, whoever sends them): the clock for evals and
        # checkpoints, so the last round closes on the job's last exchange.
        if len(self._stats) >= self.spec.replicas and self.round < schedule.total_rounds:
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
            if self._eval_duties.get(report.round) != worker_id:
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"no evaluation of round {report.round} is awaited from {worker_id}"
                )
            if report.model_state is not None and not (self.schedule and self.schedule.is_last(report.round)):
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"the model is exported after the last round, not round {report.round}"
                )
            del self._eval_duties[report.round]
            if "test" in report.results:
                self.last_test_error = report.results["test"][1]
            for split, (loss, error) in report.results.items():
                self._emit(
                    {
                        "kind": "eval",
                        "round": report.round,
                        "epoch": report.epoch,
                        "split": split,
                        "loss": loss,
                        "error": error,
                    }
                )
            if report.model_state is not None:
                save_tensors(self.directory / "final.safetensors", report.model_state)
            if self._awaiting_eval == report.round:
                self._awaiting_eval, self._evaluator = None, None
            self._maybe_finish()

    def report_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None:
        """A replica's weights x after the elastic step of closed round ``round`` (its whole state on checkpoint
        rounds); async, before round 0, the shared start that becomes the center."""
        with self._cond:
            member = self._member(worker_id)
            x = state.get("x")
            if x is None:
                raise CoordinatorError("INVALID_ARGUMENT", f"replica state from {worker_id} has no 'x'")
            self._check_tensor(x, f"replica {member.replica}'s weights x")
            if self.spec.optim.mode == "async":  # the shared start; a second replica's copy of it is moot
                if self.center is None:
                    self.center = x.detach().reshape(-1).clone()
                    self.model = self.center.clone()
                return
            pending = self._pending
            if pending is None or pending.round != round or member.replica in pending.reported:
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"no model is being gathered from {worker_id} at round {round}"
                )
            if pending.checkpoint:
                missing = sorted({"outer_buf", "outer_steps", "sampler"} - state.keys())
                if missing:
                    raise CoordinatorError(
                        "INVALID_ARGUMENT", f"replica state from {worker_id} lacks {', '.join(missing)} at a checkpoint"
                    )
                pending.states[member.replica] = state
            pending.total.add(x)
            pending.reported.add(member.replica)
            if pending.complete:
                self._finish_model(pending)
            self._maybe_finish()

    def _finish_model(self, pending: PendingModel) -> None:
        """The model of ``pending.round`` is complete: keep it for evaluators, checkpoint if due."""
        if pending.total.count:
            model, _ = pending.total.finish()
        else:  # every replica left before uploading: the last model we had, or the center
            model = self.model if self.model is not None else pending.center
        self.model = model
        self._models[pending.round] = model
        self._models.pop(pending.round - 2, None)
        self._pending = None
        if pending.checkpoint:
            self._write_checkpoint(pending.round + 1, pending.states, pending.center)
        self._cond.notify_all()

    def fetch_model(self, worker_id: str, round: int, timeout: float | None = None) -> Tensor:
        """The model of closed round ``round`` once every replica has uploaded its x (the evaluator's input)."""
        with self._cond:
            self._member(worker_id)
            give_up = None if timeout is None else time.monotonic() + timeout
            while round not in self._models:
                self._require_running()
                if round < self.round and (self._pending is None or self._pending.round != round):
                    raise CoordinatorError("FAILED_PRECONDITION", f"the model of round {round} is not kept")
                remaining = None if give_up is None else give_up - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CoordinatorError(
                        "DEADLINE_EXCEEDED", f"the model of round {round} was not complete in {timeout}s"
                    )
                self._cond.wait(remaining)
            return self._models[round]

    def _write_checkpoint(self, round: int, states: dict[int, dict[str, Tensor]], center: Tensor | None = None) -> Path:
        """Checkpoint at ``round`` (the next round to run): the model, the center, the replicas' states."""
        center = self.center if center is None else center
        assert center is not None
        model = self.model if self.model is not None else center.clone()  # safetensors refuses shared memory
        started = time.monotonic()
        path = self.store.save(
            round,
            pack_job_state(model, center, states),
            {
                "job": self.job_id,
                "elapsed": self.elapsed(),
                "spec": self.spec.to_dict(),
                "train_size": self.train_size,
                "values": self._values(round).__dict__,
            },
        )
        self._emit({"kind": "checkpoint", "round": round, "path": str(path), "seconds": time.monotonic() - started})
        return path

    def checkpoint_now(self) -> Path | None:
        """A checkpoint of the model and center alone, right away (e.g. on ``ray job stop``): a resume from
        it restarts the replicas from the model."""
        with self._cond:
            if self.center is None:
                return None
            return self._write_checkpoint(self.round, {})

    def close(self) -> None:
        """Let go of the job (the coordinator stops, or released it after it finished): calls waiting on a
        round or a model wake up and answer UNAVAILABLE, later calls too; the metrics log is closed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self.log.close()

    def drop_replica(self, replica: int, why: str = "lost") -> None:
        """Drop the member serving ``replica`` (its runtime saw it die)."""
        with self._cond:
            for worker_id, member in list(self._members.items()):
                if member.replica == replica:
                    self._drop(worker_id, why)

    def _maybe_finish(self) -> None:
        if self.rounds_done and not self.state.terminal and self._awaiting_eval is None and self._pending is None:
            if self.center is not None:
                model = self.model if self.model is not None else self.center.clone()
                save_tensors(self.directory / "reference.safetensors", {"reference": model, "center": self.center})
            self._set_state(JobState.SUCCEEDED)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.round = ckpt.round
        self.model, self.center, self._saved_states = unpack_job_state(ckpt.tensors)
        size = ckpt.meta.get("train_size")
        if isinstance(size, int):
            self._learn_train_size(size, "the checkpoint")
        self._elapsed_before = float(ckpt.meta.get("elapsed", 0.0))
        log.info("job %s: resuming at round %d from %s", self.job_id, self.round, ckpt.path)
