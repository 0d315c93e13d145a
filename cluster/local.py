"""The local runtime (the embedded default): the coordinator's job and n replicas in this process,
joined by the in-process transport, each replica in its own thread running the ordinary worker loop.

Placement (``replica_device``): ``device: cpu`` puts every replica on the CPU, ``cuda:N`` every replica on
GPU N, ``cuda`` replica a on GPU a mod G over the G visible GPUs (the process runtime places its worker
processes by the same rule).

Replicas that share a device take their compute turns in replica order (one ``OrderedTurns`` per
device): they would compete for the same cores or GPU anyway, and a fixed order makes runs reproducible
(the same seeds give the same weights, and a resumed run continues the uninterrupted trajectory exactly).
Replicas on different GPUs compute at the same time. What the turns protect stays correct when groups
run concurrently: each replica draws from its own streams (sampler, Langevin noise), and the global
stream its model draws from (dropout) is torch's CPU generator for a CPU replica, which only the one CPU
group swaps, and its own GPU's default generator for a CUDA replica, which only that GPU's group swaps
(``worker.replica_rng.ReplicaRng``). A sync round's mean does not depend on which group reports first: the
coordinator sums the float32 reports in float64, where a few replicas' sum is exact (unless an element
differs across them by a factor of more than about 2^27), so the order of additions does not change it.
An async (EASGD) round does depend on the order, so there the exchanges themselves also go in replica
order across all groups (``exchange_turns``), while the chains still overlap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import yaml

from coordinator.checkpoint import CheckpointStore, write_atomic_text
from coordinator.job import Job, JobState, Listener
from protos.messages import CoordinatorError
from protos.spec import JobSpec, SpecError, resolve
from worker.loop import WorkerLoop, no_turns
from worker.transports.inprocess import InProcessTransport
from worker.workloads import build_model, load_dataset
from worker.workloads.trust import Trust

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


def replica_device(spec_device: str, replica: int, device_count: int) -> str:
    """Where replica ``replica`` computes for the spec's ``device`` (``cpu | cuda | cuda:N``) with
    ``device_count`` visible GPUs: ``cpu`` and ``cuda:N`` as they are, ``cuda`` -> ``cuda:(replica mod G)``.
    Raises SpecError (one line naming ``device``) when the GPU asked for is not visible."""
    if spec_device == "cpu":
        return "cpu"
    if device_count < 1:
        raise SpecError(
            f"device: {spec_device}, but no CUDA GPU is visible (torch.cuda.is_available() is false); use device: cpu"
        )
    if spec_device == "cuda":
        return f"cuda:{replica % device_count}"
    index = int(spec_device.removeprefix("cuda:"))
    if index >= device_count:
        raise SpecError(f"device: {spec_device}, but only {device_count} CUDA GPU(s) are visible (cuda:0..)")
    return spec_device


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(spec_device: str) -> None:
    """Raises SpecError when the spec asks for a GPU this machine does not have."""
    if spec_device != "cpu":
        replica_device(spec_device, 0, visible_gpus())


class OrderedTurns:
    """Hands out compute turns to ``members`` (a count: replicas 0..n-1, or the replicas' indices) in
    replica order; finished replicas drop out of the rotation."""

    def __init__(self, members: int | Iterable[int]) -> None:
        self._cond = threading.Condition()
        self._active = sorted(range(members) if isinstance(members, int) else members)
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
class Placement:
    """Each replica's device and the turns it takes: one ``OrderedTurns`` per device, shared by the
    replicas on it; ``exchange_turns`` orders async exchanges across devices (None: one device)."""

    devices: list[str]
    turns: dict[str, OrderedTurns]
    exchange_turns: OrderedTurns | None = None

    def turns_of(self, replica: int) -> OrderedTurns:
        return self.turns[self.devices[replica]]

    def retire(self, replica: int) -> None:
        self.turns_of(replica).retire(replica)
        if self.exchange_turns is not None:
            self.exchange_turns.retire(replica)

    def close(self) -> None:
        for turns in [*self.turns.values(), *([self.exchange_turns] if self.exchange_turns else [])]:
            turns.close()


def place_replicas(spec_device: str, replicas: int, device_count: int, ordered_exchanges: bool = False) -> Placement:
    """Devices by ``replica_device`` and one turn group per device; ``ordered_exchanges`` (async jobs): with
    more than one group, the exchanges also go in replica order across groups."""
    devices = [replica_device(spec_device, r, device_count) for r in range(replicas)]
    groups = {d: [r for r, where in enumerate(devices) if where == d] for d in dict.fromkeys(devices)}
    exchange = OrderedTurns(replicas) if ordered_exchanges and len(groups) > 1 else None
    return Placement(devices, {d: OrderedTurns(members) for d, members in groups.items()}, exchange)


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
    device_count: int | None = None,
) -> LocalResult:
    """Run ``spec`` in this process. ``device_count``: GPUs to place replicas on (default: the visible ones)."""
    if device_count is None:
        device_count = visible_gpus() if spec.device != "cpu" else 0
    placement = place_replicas(spec.device, spec.replicas, device_count, ordered_exchanges=spec.optim.mode == "async")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = CheckpointStore(run_dir / "checkpoints").latest() if resume else None
    if resume and checkpoint is None:
        log.warning("no good checkpoint in %s: starting from round 0", run_dir)
    if not resume:
        write_atomic_text(run_dir / CONFIG_FILE, spec.to_yaml())
    job = Job("local", spec, run_dir, listeners=listeners, resume=checkpoint, train_size=train_size)
    errors: list[str] = []

    def replica_thread(replica: int) -> None:
        worker = WorkerLoop(
            InProcessTransport(job),
            f"replica-{replica}",
            placement.devices[replica],
            replica,
            placement.turns_of(replica),
            exchange_turns=placement.exchange_turns or no_turns,
            trust=Trust.for_spec(spec),  # one's own config on one's own machine
        )
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
            placement.retire(replica)

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
        placement.close()
        raise
    finally:
        job.close()  # after the job's last writes (its reference, then its final state)
    log.info("job finished in %.1fs: %s", time.monotonic() - started, job.state.value)
    return LocalResult(job.state, job.message, run_dir, job.round, errors)
