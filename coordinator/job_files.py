"""A job's files: its checkpoints, its round state, the exported model, its reference and its events.

Every write runs on the job's disk writer (disk_writer.py), in the order handed over, never under the job's
lock: a slow or full disk never delays a heartbeat or another job. The job decides under its lock what to
write (tensors that could still change are copied first) and what happens once it is written; this module
writes, reports how it went and never raises into the job.

- A checkpoint that cannot be written keeps the previous one (a ``checkpoint_failed`` event); the job goes on.
- A round state that cannot be written is logged; the job goes on (a restart resumes from an older one).
- The exported model or the reference not writable: the job's result is missing, so the job fails, saying
  which file and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from torch import Tensor

from coordinator.checkpoint import CheckpointStore, CheckpointWriteError, one_line
from coordinator.disk_writer import DiskWriter
from coordinator.events import save_tensors
from coordinator.job_events import CheckpointFailed, CheckpointWritten, JobEvent
from coordinator.round_state import FILE as ROUND_STATE_FILE
from coordinator.round_state import RoundState, save_round_state

log = logging.getLogger(__name__)
EXPORT_FILE = "final.safetensors"  # the model the last evaluator exported
REFERENCE_FILE = "reference.safetensors"  # the job's model and center at its end


class JobFiles:
    def __init__(self, job_id: str, directory: Path, keep: int, emit: Callable[[JobEvent], None]) -> None:
        self.job_id = job_id
        self.directory = directory
        self.store = CheckpointStore(directory / "checkpoints", keep=keep)
        self._emit = emit
        self._writer = DiskWriter(f"job-writer:{job_id}")

    def checkpoint(self, round: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Future[Path | None]:
        """Its result: the checkpoint's path, or None when it could not be written."""
        return self._writer.submit(lambda: self._save_checkpoint(round, tensors, meta))

    def _save_checkpoint(self, round: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path | None:
        started = time.monotonic()
        try:
            path = self.store.save(round, tensors, meta)
        except CheckpointWriteError as err:  # disk full: the job goes on from the previous checkpoint
            log.error("job %s: %s", self.job_id, err)
            self._emit(CheckpointFailed(round, str(err)))
            return None
        self._emit(CheckpointWritten(round, str(path), time.monotonic() - started))
        return path

    def round_state(self, state: RoundState, then: Callable[[RoundState], None]) -> None:
        """Save ``state``, then call ``then`` (written or not: the job must not wait on it forever)."""
        self._writer.submit(lambda: self._save_round_state(state, then))

    def _save_round_state(self, state: RoundState, then: Callable[[RoundState], None]) -> None:
        try:
            save_round_state(self.directory / ROUND_STATE_FILE, state)
        except Exception as err:  # e.g. a full disk
            log.error(
                "job %s: round state of round %d not written (%s): a restart would resume from an older one",
                self.job_id,
                state.round,
                one_line(err),
            )
        then(state)

    def export(self, model_state: dict[str, Tensor], failed: Callable[[str], None]) -> None:
        """Save the exported model; ``failed`` gets the reason when it cannot be."""
        self._writer.submit(lambda: self._save_result(EXPORT_FILE, model_state, failed, lambda: None))

    def reference(
        self, tensors: dict[str, Tensor] | None, failed: Callable[[str], None], then: Callable[[], None]
    ) -> None:
        """Save the reference (after everything handed over before), then call ``then``, or ``failed``."""
        self._writer.submit(lambda: self._save_result(REFERENCE_FILE, tensors, failed, then))

    def _save_result(
        self, name: str, tensors: dict[str, Tensor] | None, failed: Callable[[str], None], then: Callable[[], None]
    ) -> None:
        if tensors is not None:
            try:
                save_tensors(self.directory / name, tensors)
            except OSError as err:
                failed(f"the job's result could not be saved: {one_line(err)}")
                return
        then()

    def in_order(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the writer after what was handed over before (e.g. an event for the log)."""
        self._writer.submit(work)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Return once every write handed over so far is done."""
        self._writer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop; never called holding the job's lock (the writes' callbacks take it)."""
        self._writer.close(timeout)
