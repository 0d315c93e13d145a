"""The standing coordinator's job manager: many jobs, the registry, worker assignment, leases, resume.

Transport-free: the gRPC servicers in ``coordinator.server`` translate requests into these calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator import metrics
from coordinator.checkpoint import CheckpointStore, write_atomic_text
from coordinator.job import Job, JobState
from coordinator.registry import JobRecord, Registry
from coordinator.round_state import FILE as ROUND_STATE_FILE
from coordinator.round_state import load_round_state
from protos.messages import CoordinatorError
from protos.spec import JobSpec, SpecError, resolve

log = logging.getLogger(__name__)

ListenerFactory = Callable[[str], list[Callable[[dict[str, Any]], None]]]
MAX_PENDING_JOBS = 64  # jobs waiting for their first worker; one more Submit is RESOURCE_EXHAUSTED
RELEASE_AFTER_S = 60.0  # a finished job stays in memory this long (its workers learn it ended), then only on disk
METRICS_RETENTION_S = 3600.0  # its Prometheus series are dropped this long after it finished


class StateDirLocked(RuntimeError):
    """Another coordinator holds the state directory."""


def lock_state_dir(state_dir: Path) -> int:
    """An exclusive ``flock`` on STATE_DIR/coordinator.lock, held until the returned descriptor is closed
    (the kernel drops it when the process dies, so a crash leaves no stale lock)."""
    path = state_dir / "coordinator.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StateDirLocked(
            f"state directory {state_dir} is in use by another coordinator (pid {holder}); stop it or pick "
            "another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class JobManager:
    def __init__(
        self,
        state_dir: Path,
        listeners: ListenerFactory | None = None,
        reap_every_s: float = 0.5,
        *,
        max_pending: int = MAX_PENDING_JOBS,
        release_after_s: float = RELEASE_AFTER_S,
        metrics_retention_s: float = METRICS_RETENTION_S,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = lock_state_dir(self.state_dir)
        try:
            self.registry = Registry(self.state_dir / "registry.sqlite")
        except BaseException:
            self._unlock()
            raise
        self._listeners = listeners or (lambda job_id: [])
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._watchers: dict[str, list[queue.Queue[dict[str, Any] | None]]] = {}
        self._finished: dict[str, float] = {}  # job id -> when it was seen terminal (monotonic), until released
        self._released: dict[str, float] = {}  # job id -> when released, until its metric series are dropped
        self.max_pending = max_pending
        self.release_after_s = release_after_s
        self.metrics_retention_s = metrics_retention_s
        self._stop = threading.Event()
        self._closed = False
        self._reload()
        self._reaper = threading.Thread(target=self._reap, args=(reap_every_s,), name="lease-reaper", daemon=True)
        self._reaper.start()

    # ----- jobs ----------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        record = self.registry.get(job_id)
        return Path(record.directory) if record else self.state_dir / "jobs" / job_id

    def _open(self, job_id: str, spec: JobSpec, resume: bool, directory: Path | None = None) -> Job:
        directory = directory or self.job_dir(job_id)
        ckpt = CheckpointStore(directory / "checkpoints").latest() if resume else None
        # Saved every round (sync): a restart resumes at the round the job was in, the workers offering
        # their replicas back; the checkpoint remains for replicas whose worker is gone too.
        round_state = load_round_state(directory / ROUND_STATE_FILE) if resume else None
        listeners = [*self._listeners(job_id), self._recorder(job_id)]
        job = Job(
            job_id, spec, directory, listeners=listeners, resume=ckpt, round_state=round_state, persist_rounds=True
        )
        self._jobs[job_id] = job
        return job

    def _reload(self) -> None:
        for record in reversed(self.registry.all()):  # oldest first: they get workers first
            if JobState(record.state).terminal:
                continue
            try:
                job = self._open(record.id, resolve(json.loads(record.spec_json)), resume=True)
            except (SpecError, ValueError, OSError) as err:  # one broken job must not keep the others down
                log.error("job %s cannot be reloaded: %s", record.id, err)
                self.registry.update(record.id, state=JobState.FAILED.value, message=f"cannot be reloaded: {err}")
                continue
            log.info("job %s (%s): reloaded at round %d, waiting for workers", record.id, record.name, job.round)

    def submit(self, spec: JobSpec, directory: Path | None = None) -> str:
        """Register and open a job; its files go to ``directory`` (default STATE_DIR/jobs/ID, created here and
        only here: an id is the name plus 128 random bits, its registry row is written first, and its run
        directory must not exist yet)."""
        with self._lock:
            pending = sum(1 for j in self._jobs.values() if j.state is JobState.PENDING)
            if pending >= self.max_pending:
                raise CoordinatorError(
                    "RESOURCE_EXHAUSTED",
                    f"{pending} jobs are waiting for workers, the most this coordinator queues; "
                    "cancel some or retry later",
                )
            for _ in range(3):
                job_id = f"{spec.name}-{uuid.uuid4().hex}"
                where = Path(directory or self.state_dir / "jobs" / job_id).absolute()
                try:
                    self.registry.add(job_id, spec.name, json.dumps(spec.to_dict()), JobState.PENDING.value, where)
                except sqlite3.IntegrityError:  # an id in use: draw again
                    continue
                break
            else:  # pragma: no cover - 128 random bits
                raise CoordinatorError("INTERNAL", "could not draw an unused job id")
            try:
                where.mkdir(parents=True, exist_ok=directory is not None)
                write_atomic_text(where / "config.yaml", spec.to_yaml())
                self._open(job_id, spec, resume=False, directory=where)
            except BaseException:
                self.registry.remove(job_id)
                raise
        log.info("job %s submitted: %s, %d replicas", job_id, spec.preset, spec.replicas)
        return job_id

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise CoordinatorError("NOT_FOUND", f"no running job {job_id!r} (see `parle jobs`)")
        return job

    def live_jobs(self) -> int:
        """Jobs held in memory (running, pending, or finished less than ``release_after_s`` ago)."""
        with self._lock:
            return len(self._jobs)

    def record(self, job_id: str) -> JobRecord:
        record = self.registry.get(job_id)
        if record is None:
            raise CoordinatorError("NOT_FOUND", f"no job {job_id!r} (see `parle jobs`)")
        return record

    def assign(self, job_id: str | None) -> Job:
        """The job a joining worker should serve: the one it asked for, or the oldest that needs workers."""
        if job_id:
            self.record(job_id)
            return self.job(job_id)
        with self._lock:
            open_jobs = [
                j
                for j in self._jobs.values()
                if not j.state.terminal and not j.rounds_done and j.live_workers < j.spec.replicas
            ]
        if not open_jobs:
            raise CoordinatorError("UNAVAILABLE", "no job needs a worker right now")
        return open_jobs[0]

    def cancel(self, job_id: str) -> None:
        self.record(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancel()

    def list(self) -> list[JobRecord]:
        return self.registry.all()

    # ----- events --------------------------------------------------------------------------------

    def _recorder(self, job_id: str) -> Callable[[dict[str, Any]], None]:
        def record(event: dict[str, Any]) -> None:
            try:
                if event["kind"] == "state":
                    self.registry.update(job_id, state=event["state"], message=event["message"], round=event["round"])
                elif event["kind"] == "round":
                    self.registry.update(job_id, round=event["round"] + 1)
            except sqlite3.Error as err:  # disk full: the job goes on; the registry catches up on the next event
                log.error("job %s: registry not updated (%s)", job_id, err)
            with self._lock:
                watchers = list(self._watchers.get(job_id, []))
            for q in watchers:
                q.put(event)

        return record

    def watch(self, job_id: str) -> queue.Queue[dict[str, Any] | None]:
        self.record(job_id)
        q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._lock:
            self._watchers.setdefault(job_id, []).append(q)
        return q

    def unwatch(self, job_id: str, q: queue.Queue[dict[str, Any] | None]) -> None:
        with self._lock:
            watchers = self._watchers.get(job_id, [])
            if q in watchers:
                watchers.remove(q)
            if not watchers:
                self._watchers.pop(job_id, None)

    # ----- leases --------------------------------------------------------------------------------

    def _reap(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                if not job.state.terminal:
                    job.expire(job.spec.runtime.lease_s)
                    try:
                        job.open_gang_if_due()
                    except Exception:  # e.g. a checkpoint that cannot be written: the reaper must go on
                        log.exception("job %s: could not start without its missing replicas", job.job_id)
            self._release_finished()

    def _release_finished(self) -> None:
        """Finished jobs leave memory ``release_after_s`` after they ended (the registry and the run directory
        keep them for Get, List and Download); their metric series go ``metrics_retention_s`` later."""
        now = time.monotonic()
        with self._lock:
            for job_id, job in list(self._jobs.items()):
                if job.state.terminal:
                    self._finished.setdefault(job_id, now)
            due = [j for j, t in self._finished.items() if now - t >= self.release_after_s]
            released = [self._jobs[j] for j in due if j in self._jobs]
        for job in released:
            job.close()  # its last events reach the registry first: Get reads it once the job is gone
        with self._lock:
            for job_id in due:
                self._jobs.pop(job_id, None)
                self._finished.pop(job_id, None)
                self._released[job_id] = now
        for job in released:
            log.info("job %s (%s): released from memory", job.job_id, job.state.value)
        expired = [j for j, t in self._released.items() if now - t >= self.metrics_retention_s]
        for job_id in expired:
            del self._released[job_id]
            metrics.remove_job(job_id)

    def checkpoint_all(self) -> None:
        """Checkpoint every running job now (the coordinator is stopping): a restart resumes each from here."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.state.terminal]
        for job in jobs:
            try:
                path = job.checkpoint_now()
            except Exception:
                log.exception("job %s: checkpoint at shutdown failed", job.job_id)
                continue
            if path is not None:
                log.info("job %s: checkpointed at round %d (%s)", job.job_id, job.round, path)

    def close_jobs(self) -> None:
        """Close every job: handlers waiting on one wake up and answer UNAVAILABLE; logs are closed."""
        self._stop.set()
        with self._lock:
            jobs = list(self._jobs.values())
            for watchers in self._watchers.values():
                for q in watchers:
                    q.put(None)
        for job in jobs:
            job.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_jobs()
        self._reaper.join(timeout=5)
        with self._lock:
            self._jobs.clear()
        self.registry.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
