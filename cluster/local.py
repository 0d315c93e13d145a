"""The local runtime (the embedded default): the coordinator's job and n replicas in this process,
joined by the in-process transport, each replica in its own thread running the ordinary worker loop.

Replicas take their compute turns in replica order (``OrderedTurns``): on one machine they would
compete for the same cores anyway, and a fixed order makes runs reproducible (the same seeds give
the same weights, and a resumed run continues the uninterrupted trajectory exactly).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from coordinator.checkpoint import CheckpointStore, write_atomic_text
from coordinator.job import Job, JobState, Listener
from protos.messages import CoordinatorError
from protos.spec import JobSpec, SpecError, resolve
from worker.loop import WorkerLoop
from worker.transports.inprocess import InProcessTransport
from worker.workloads import build_model, load_dataset

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


class OrderedTurns:
    """Hands out compute turns in replica order; finished replicas drop out of the rotation."""

    def __init__(self, replicas: int) -> None:
        self._cond = threading.Condition()
        self._active = list(range(replicas))
        self._next = 0
        self._closed = False

    @contextlib.contextmanager
    def __call__(self, replica: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._active[self._next] == replica)
        try:
            yield
        finally:
            with self._cond:
                if not self._closed:
                    self._next = (self._active.index(replica) + 1) % len(self._active)
                self._cond.notify_all()

    def retire(self, replica: int) -> None:
        with self._cond:
            if replica in self._active and len(self._active) > 1:
                current = self._active[self._next]
                self._active.remove(replica)
                if current == replica:
                    self._next %= len(self._active)
                else:
                    self._next = self._active.index(current)
            elif replica in self._active:
                self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class LocalResult:
    state: JobState
    message: str
    run_dir: Path
    rounds: int
    errors: list[str] = field(default_factory=list)


def preflight(spec: JobSpec) -> int:
    """Load the dataset and build the model once, so bad data or a model path that does not import is
    reported before anything is written (raises WorkloadError). Returns the training set's size."""
    data = load_dataset(spec.data, seed=spec.seed)
    build_model(spec.model, data.input_shape, data.num_classes)
    return int(data.train_x.shape[0])


def new_run_dir(spec: JobSpec, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{spec.name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{spec.name}-{stamp}-{suffix}"
    return path


def load_run_spec(run_dir: Path) -> JobSpec:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise SpecError(f"--resume: {run_dir}: not a run directory (no {CONFIG_FILE})")
    return resolve(yaml.safe_load(path.read_text()))


def run_local(
    spec: JobSpec,
    run_dir: Path,
    resume: bool = False,
    listeners: list[Listener] | None = None,
    train_size: int | None = None,
) -> LocalResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = CheckpointStore(run_dir / "checkpoints").latest() if resume else None
    if resume and checkpoint is None:
        log.warning("no good checkpoint in %s: starting from round 0", run_dir)
    if not resume:
        write_atomic_text(run_dir / CONFIG_FILE, spec.to_yaml())
    job = Job("local", spec, run_dir, listeners=listeners, resume=checkpoint, train_size=train_size)
    turns = OrderedTurns(spec.replicas)
    errors: list[str] = []

    def replica_thread(replica: int) -> None:
        worker = WorkerLoop(InProcessTransport(job), f"replica-{replica}", spec.device, replica, turns)
        try:
            worker.run()
        except CoordinatorError as err:
            if not job.state.terminal:
                errors.append(f"replica {replica}: {err}")
        except Exception as err:  # a crashed replica fails the job instead of hanging the others
            log.exception("replica %d crashed", replica)
            errors.append(f"replica {replica}: {err}")
            job.abort(f"replica {replica}: {err}")
        finally:
            turns.retire(replica)

    threads = [
        threading.Thread(target=replica_thread, args=(r,), name=f"replica-{r}", daemon=True)
        for r in range(spec.replicas)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        job.cancel()
        turns.close()
        raise
    finally:
        job.log.close()
    log.info("job finished in %.1fs: %s", time.monotonic() - started, job.state.value)
    return LocalResult(job.state, job.message, run_dir, job.round, errors)
