"""The standing coordinator's job manager: many jobs, the registry, worker assignment, leases, resume.

Transport-free: the gRPC servicers in ``coordinator.server`` translate requests into these calls.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.checkpoint import CheckpointStore, write_atomic_text
from coordinator.job import Job, JobState
from coordinator.registry import JobRecord, Registry
from protos.messages import CoordinatorError
from protos.spec import JobSpec, SpecError, resolve

log = logging.getLogger(__name__)

ListenerFactory = Callable[[str], list[Callable[[dict[str, Any]], None]]]


class JobManager:
    def __init__(self, state_dir: Path, listeners: ListenerFactory | None = None, reap_every_s: float = 0.5) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(self.state_dir / "registry.sqlite")
        self._listeners = listeners or (lambda job_id: [])
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._watchers: dict[str, list[queue.Queue[dict[str, Any] | None]]] = {}
        self._stop = threading.Event()
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
        listeners = [*self._listeners(job_id), self._recorder(job_id)]
        job = Job(job_id, spec, directory, listeners=listeners, resume=ckpt)
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
        """Register and open a job; its files go to ``directory`` (default STATE_DIR/jobs/ID)."""
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        directory = Path(directory or self.state_dir / "jobs" / job_id).absolute()
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic_text(directory / "config.yaml", spec.to_yaml())
            self._open(job_id, spec, resume=False, directory=directory)  # raises before anything is registered
            self.registry.add(job_id, spec.name, json.dumps(spec.to_dict()), JobState.PENDING.value, directory)
        log.info("job %s submitted: %s, %d replicas", job_id, spec.preset, spec.replicas)
        return job_id

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise CoordinatorError("NOT_FOUND", f"no running job {job_id!r} (see `parle jobs`)")
        return job

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
            if event["kind"] == "state":
                self.registry.update(job_id, state=event["state"], message=event["message"], round=event["round"])
            elif event["kind"] == "round":
                self.registry.update(job_id, round=event["round"] + 1)
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
            if q in self._watchers.get(job_id, []):
                self._watchers[job_id].remove(q)

    # ----- leases --------------------------------------------------------------------------------

    def _reap(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                jobs = [j for j in self._jobs.values() if not j.state.terminal]
            for job in jobs:
                job.expire(job.spec.runtime.lease_s)

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)
        with self._lock:
            for watchers in self._watchers.values():
                for q in watchers:
                    q.put(None)
            for job in self._jobs.values():
                job.log.close()
        self.registry.close()
