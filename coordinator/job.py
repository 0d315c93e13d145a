"""One job's coordinator side: membership, the round clock, the reference rule, duties, checkpoints.

Transport-agnostic and thread-safe: the in-process transport calls it from worker threads, the gRPC
server from its handler threads. Every request is validated before it touches state, so a rejected
update never changes the reference (DESIGN.md section 4). Events (rounds, evals, checkpoints, state
changes) go to ``metrics.jsonl`` in the job directory and to listeners (progress bars, metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coordinator.checkpoint import Checkpoint, CheckpointStore, pack_job_state, unpack_job_state
from coordinator.events import MetricsLog, save_tensors
from coordinator.job_records import ClosedRound, JobState, Member, PendingCheckpoint
from coordinator.reference import SyncMean, elastic_pull_
from coordinator.schedules import Schedule
from protos.messages import (
    CoordinatorError,
    Directives,
    EvalReport,
    ExchangeReply,
    JoinGrant,
    RoundStats,
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
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.schedule = Schedule(spec)
        self.directory = Path(directory)
        self.store = CheckpointStore(self.directory / "checkpoints", keep=spec.checkpoint.keep)
        self.listeners = list(listeners or [])
        self.state = JobState.PENDING
        self.message = ""
        self._cond = threading.Condition()
        self._members: dict[str, Member] = {}
        self._next_worker = 0
        self._sum = SyncMean()
        self._reported: set[str] = set()
        self._stats: list[RoundStats] = []
        self._closed: dict[int, ClosedRound] = {}
        self._checkpoint: PendingCheckpoint | None = None
        self._awaiting_eval: int | None = None
        self._evaluator: str | None = None
        self.last_train_loss: float | None = None
        self.last_test_error: float | None = None
        self._saved_states: dict[int, dict[str, Tensor]] = {}
        self.round = 0
        self.reference: Tensor | None = None
        self._elapsed_before = 0.0
        self._started = time.monotonic()
        self._round_opened = self._started
        # Sync rounds wait until every requested replica has joined (or start_timeout_s passed), so that
        # the first rounds are not closed by whichever worker happened to start first.
        self._gang_ready = spec.optim.mode == "async"
        self._first_join: float | None = None
        if resume is not None:
            self._restore(resume)
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
        if self.state.terminal:
            raise CoordinatorError(
                "FAILED_PRECONDITION", f"job {self.job_id} is {self.state.value}: {self.message}".rstrip(": ")
            )

    def _check_tensor(self, mu: Tensor) -> None:
        if mu.dim() != 1 or not mu.is_floating_point():
            raise CoordinatorError(
                "INVALID_ARGUMENT",
                f"coupled average must be a flat float tensor, got {mu.dtype} {list(mu.shape)}",
            )
        if self.reference is not None and mu.numel() != self.reference.numel():
            raise CoordinatorError(
                "INVALID_ARGUMENT",
                f"coupled average has {mu.numel()} elements, the reference has {self.reference.numel()}",
            )
        if not bool(torch.isfinite(mu).all()):
            raise CoordinatorError("INVALID_ARGUMENT", "coupled average contains NaN or Inf")

    # ----- membership ----------------------------------------------------------------------------

    @property
    def rounds_done(self) -> bool:
        """Every round has closed (final duties such as the last eval may still be running)."""
        return self.round >= self.schedule.total_rounds

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
            start = None if self.reference is None or saved is not None else self.reference.clone()
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
                values=self.schedule.values(self.round),
                start=start,
                replica_state=saved,
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
        pending = self._checkpoint
        if pending is not None and member.replica not in pending.states:
            pending.expected.discard(member.replica)
            if set(pending.states) >= pending.expected:
                self._write_checkpoint(pending)
                self._checkpoint = None
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
        """Report a coupled average and wait for the round's reference (sync) or get it at once (async)."""
        early = self.report(worker_id, round, mu, stats)
        return early if early is not None else self.await_round(worker_id, round, timeout)

    def report(self, worker_id: str, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply | None:
        """Validate and add a coupled average; the caller may drop ``mu`` afterwards (the sum keeps no
        reference to it), so waiting workers hold no model-sized memory. Async rounds reply at once."""
        with self._cond:
            self._require_running()
            member = self._member(worker_id)
            self._check_tensor(mu)
            if self.spec.optim.mode == "async":
                return self._exchange_async(member, round, mu, stats)
            if round != self.round or worker_id in self._reported:
                what = "stale" if round < self.round or worker_id in self._reported else "future"
                raise CoordinatorError(
                    "FAILED_PRECONDITION", f"{what} round {round}: job {self.job_id} is in round {self.round}"
                )
            self._sum.add(mu)
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
        directives = Directives(
            evaluate=closed.evaluator == worker_id,
            export=closed.evaluator == worker_id and closed.stop,
            checkpoint=closed.checkpoint,
            stop=closed.stop,
        )
        return ExchangeReply(round, closed.reference, closed.next_values, directives)

    def _close_round(self, evaluator_hint: str | None = None) -> ClosedRound:
        k = self.round
        workers = self._sum.count
        reference, consensus = self._sum.finish()
        live = sorted(self._members.values(), key=lambda m: m.replica)
        evaluator = None
        if live and self.schedule.eval_due(k):
            evaluator = evaluator_hint or live[0].worker_id
        checkpoint = self.schedule.checkpoint_due(k)
        stop = self.schedule.is_last(k)
        closed = ClosedRound(reference, self.schedule.values(k + 1), evaluator, checkpoint, stop)
        self._closed[k] = closed
        self._closed.pop(k - 2, None)
        values = self.schedule.values(k)
        losses = [s.train_loss for s in self._stats]
        now = time.monotonic()
        self._emit(
            {
                "kind": "round",
                "round": k,
                "epoch": self.schedule.epoch(k + 1),
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
        self.reference = reference
        if checkpoint:
            # Async replicas never stand still together: its checkpoints hold the reference only.
            replicas = {m.replica for m in live} if self.spec.optim.mode == "sync" else set()
            self._checkpoint = PendingCheckpoint(k + 1, reference.clone(), replicas)
            if not replicas:
                self._write_checkpoint(self._checkpoint)
                self._checkpoint = None
        if evaluator is not None:
            self._awaiting_eval, self._evaluator = k, evaluator
        self.last_train_loss = sum(losses) / len(losses)
        self.round = k + 1
        self._sum = SyncMean()
        self._reported = set()
        self._stats = []
        self._round_opened = now
        self._cond.notify_all()
        self._maybe_finish()
        return closed

    def _exchange_async(self, member: Member, round: int, mu: Tensor, stats: RoundStats) -> ExchangeReply:
        if round != member.round:
            raise CoordinatorError("FAILED_PRECONDITION", f"worker {member.worker_id} is in round {member.round}")
        if self.reference is None:
            self.reference = mu.detach().reshape(-1).clone()
        else:
            elastic_pull_(self.reference, mu, self.spec.optim.async_beta)
        member.round += 1
        self._stats.append(stats)
        evaluate = False
        # One job round = as many reports as live replicas: the clock for evals and checkpoints.
        if len(self._stats) >= len(self._members) and self.round < self.schedule.total_rounds:
            self._sum.add(self.reference)
            closed = self._close_round(evaluator_hint=member.worker_id)
            evaluate = closed.evaluator == member.worker_id
        stop = self.schedule.is_last(round) or self.state.terminal
        directives = Directives(evaluate=evaluate, export=evaluate and stop, stop=stop)
        # An eval duty names the job round it evaluates, which is what report_eval will quote back.
        closed_round = self.round - 1 if evaluate else round
        return ExchangeReply(closed_round, self.reference.clone(), self.schedule.values(round + 1), directives)

    # ----- duties --------------------------------------------------------------------------------

    def report_eval(self, worker_id: str, report: EvalReport) -> None:
        with self._cond:
            self._member(worker_id)
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
        with self._cond:
            member = self._member(worker_id)
            pending = self._checkpoint
            if pending is None or pending.round != round:
                raise CoordinatorError("FAILED_PRECONDITION", f"no checkpoint is being taken at round {round}")
            pending.states[member.replica] = state
            if set(pending.states) >= pending.expected:
                self._write_checkpoint(pending)
                self._checkpoint = None
            self._maybe_finish()

    def _write_checkpoint(self, pending: PendingCheckpoint) -> Path:
        started = time.monotonic()
        path = self.store.save(
            pending.round,
            pack_job_state(pending.reference, pending.states),
            {
                "job": self.job_id,
                "elapsed": self.elapsed(),
                "spec": self.spec.to_dict(),
                "values": self.schedule.values(pending.round).__dict__,
            },
        )
        self._emit(
            {
                "kind": "checkpoint",
                "round": pending.round,
                "path": str(path),
                "seconds": time.monotonic() - started,
            }
        )
        return path

    def checkpoint_now(self) -> Path | None:
        """A checkpoint of the reference alone, right away (e.g. on ``ray job stop``): a resume from it
        restarts the replicas from the reference."""
        with self._cond:
            if self.reference is None:
                return None
            return self._write_checkpoint(PendingCheckpoint(self.round, self.reference.clone(), set()))

    def drop_replica(self, replica: int, why: str = "lost") -> None:
        """Drop the member serving ``replica`` (its runtime saw it die)."""
        with self._cond:
            for worker_id, member in list(self._members.items()):
                if member.replica == replica:
                    self._drop(worker_id, why)

    def _maybe_finish(self) -> None:
        if self.rounds_done and not self.state.terminal and self._awaiting_eval is None and self._checkpoint is None:
            if self.reference is not None:
                save_tensors(self.directory / "reference.safetensors", {"reference": self.reference})
            self._set_state(JobState.SUCCEEDED)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.round = ckpt.round
        self.reference, self._saved_states = unpack_job_state(ckpt.tensors)
        self._elapsed_before = float(ckpt.meta.get("elapsed", 0.0))
        log.info("job %s: resuming at round %d from %s", self.job_id, self.round, ckpt.path)
