"""The Ray runtime: ``parle train JOB --runtime ray`` (typically under ``ray job submit``).

The job's coordinator code (``coordinator.job.Job``) runs in one threaded actor pinned to the driver's
node (its run directory is the driver's); one worker actor per replica runs the ordinary worker loop
over ``RayTransport``, placed by a placement group with the job's ``runtime.ray`` resources. The driver
watches the actors: a worker actor that dies is replaced, and the replacement joins from the
reference. SIGTERM (``ray job stop``) writes a final checkpoint before the driver exits.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
from torch import Tensor

from coordinator.checkpoint import CheckpointStore, write_atomic_text
from coordinator.job import Job, JobState, Listener
from coordinator.metrics import JobMetrics
from protos.messages import Directives, EvalReport, JoinGrant, RoundStats, RoundValues
from protos.spec import JobSpec, RaySpec
from worker.loop import WorkerLoop
from worker.transports.ray import RayTransport, get
from worker.workloads.trust import Trust

log = logging.getLogger(__name__)


class RayResourceError(RuntimeError):
    """The cluster cannot hold the job's replicas; the message names what is missing."""


@ray.remote(num_cpus=0)
class CoordinatorActor:
    """The job's coordinator side. Threaded: sync exchanges block until their round closes."""

    def __init__(self, job_id: str, spec: JobSpec, directory: str, resume: bool, metrics_port: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ckpt = CheckpointStore(Path(directory) / "checkpoints").latest() if resume else None
        self._events: list[dict[str, Any]] = []
        self.job = Job(job_id, spec, Path(directory), listeners=[JobMetrics(job_id), self._events.append], resume=ckpt)
        self._lock = threading.Lock()
        self._refs: dict[int, Any] = {}
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr=ray.util.get_node_ip_address())

    def join(self, name: str, device: str, want_replica: int | None, resume_round: int | None = None) -> JoinGrant:
        return self.job.join(name, device, want_replica, resume_round)

    def offer_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None:
        self.job.offer_state(worker_id, round, state)

    def exchange(
        self, worker_id: str, round: int, mu: Tensor, stats: RoundStats
    ) -> tuple[int, list[Any], RoundValues, Directives]:
        reply = self.job.exchange(worker_id, round, mu, stats)
        if self.job.spec.optim.mode == "async":
            return reply.closed_round, [ray.put(reply.reference)], reply.next_values, reply.directives
        with self._lock:  # one object-store copy of each round's reference, shared by all workers
            if reply.closed_round not in self._refs:
                self._refs = {reply.closed_round: ray.put(reply.reference)}
            ref = self._refs[reply.closed_round]
        return reply.closed_round, [ref], reply.next_values, reply.directives

    def heartbeat(self, worker_id: str) -> bool:
        return self.job.heartbeat(worker_id)

    def report_eval(self, worker_id: str, report: EvalReport) -> None:
        self.job.report_eval(worker_id, report)

    def report_state(self, worker_id: str, round: int, state: dict[str, Tensor]) -> None:
        self.job.report_state(worker_id, round, state)

    def fetch_model(self, worker_id: str, round: int, timeout: float | None) -> Tensor:
        return self.job.fetch_model(worker_id, round, timeout)

    def fail(self, worker_id: str, reason: str) -> None:
        self.job.fail(worker_id, reason)

    def leave(self, worker_id: str) -> None:
        self.job.leave(worker_id)

    def drop_replica(self, replica: int) -> None:
        self.job.drop_replica(replica, "lost")

    def stop(self, reason: str) -> str | None:
        """Final checkpoint, then cancel (``ray job stop``, Ctrl-C)."""
        path = self.job.checkpoint_now()
        self.job.cancel()
        return str(path) if path else None

    def flush(self) -> None:
        """Return once the job's files due so far (checkpoints, round state, results) are on disk."""
        self.job.flush()

    def status(self) -> tuple[str, str]:
        return self.job.state.value, self.job.message

    def events_since(self, index: int, settle: bool = False) -> tuple[list[dict[str, Any]], str, str]:
        """``settle``: every worker is done; first wait for the job's last writes (its reference, which
        comes before its final state)."""
        if settle:
            self.job.flush()
        return self._events[index:], self.job.state.value, self.job.message

    def inspect(self) -> dict[str, Any]:
        """What tests and tools read: round, center, model, live workers."""
        job = self.job
        return {"round": job.round, "center": job.center, "model": job.model, "live_workers": job.live_workers}

    def cancel(self) -> None:
        self.job.cancel()


@ray.remote
class WorkerActor:
    """One replica: the worker loop over ``RayTransport``; the device is what Ray assigned."""

    def __init__(self, coordinator: Any, name: str, replica: int, metrics_port: int, trust: Trust) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.coordinator, self.name, self.replica, self.trust = coordinator, name, replica, trust
        if metrics_port:  # one port per replica: a replacement reuses its predecessor's (that process is gone)
            from prometheus_client import start_http_server

            start_http_server(metrics_port + 1 + replica, addr=ray.util.get_node_ip_address())

    def run(self) -> int:
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        loop = WorkerLoop(
            RayTransport(self.coordinator), self.name, device, want_replica=self.replica, trust=self.trust
        )
        loop.run()
        return loop.rounds_done


def check_resources(spec: JobSpec) -> None:
    """Fail fast when the whole cluster has less than the job asks for."""
    r = spec.runtime.ray
    total = ray.cluster_resources()
    want = {"CPU": r.num_cpus * spec.replicas, "GPU": r.num_gpus * spec.replicas}
    missing = [
        f"{k} {want[k]:g} (the cluster has {total.get(k, 0):g})" for k in want if want[k] > total.get(k, 0) + 1e-9
    ]
    if missing:
        raise RayResourceError(
            f"runtime.ray: {spec.replicas} replicas x (num_cpus {r.num_cpus:g}, num_gpus {r.num_gpus:g}) "
            f"need {', '.join(missing)}"
        )


def reserve(spec: JobSpec) -> PlacementGroup:
    r: RaySpec = spec.runtime.ray
    bundle = {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}
    pg = placement_group([bundle] * spec.replicas, strategy=r.placement)
    try:
        ray.get(pg.ready(), timeout=r.schedule_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RayResourceError(
            f"runtime.ray: could not place {spec.replicas} replicas of {bundle} with strategy {r.placement} "
            f"within {r.schedule_timeout_s:g}s (available: {ray.available_resources()})"
        ) from None
    return pg


class RayDriver:
    def __init__(self, spec: JobSpec, run_dir: Path, resume: bool = False) -> None:
        self.spec = spec
        check_resources(spec)
        self.pg = reserve(spec)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.coordinator = CoordinatorActor.options(  # type: ignore[attr-defined]
            max_concurrency=4 * spec.replicas + 16, scheduling_strategy=here
        ).remote(run_dir.name, spec, str(run_dir.absolute()), resume, spec.runtime.ray.metrics_port)
        self.workers: dict[int, Any] = {}
        self.runs: dict[Any, int] = {}
        self.replacements = 0
        for replica in range(spec.replicas):
            self.start_worker(replica)

    def start_worker(self, replica: int) -> None:
        r = self.spec.runtime.ray
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=replica)
        actor = WorkerActor.options(  # type: ignore[attr-defined]
            num_cpus=r.num_cpus, num_gpus=r.num_gpus, scheduling_strategy=strategy
        ).remote(self.coordinator, f"ray-replica-{replica}", replica, r.metrics_port, Trust.for_spec(self.spec))
        self.workers[replica] = actor
        self.runs[actor.run.remote()] = replica

    def watch(self, listeners: list[Listener], stop: threading.Event) -> tuple[JobState, str]:
        seen, state, message = 0, "pending", ""
        while self.runs:
            done, _ = ray.wait(list(self.runs), num_returns=1, timeout=0.5)
            for ref in done:
                replica = self.runs.pop(ref)
                try:
                    ray.get(ref, timeout=30)
                except RayActorError as err:
                    self.replace(replica, err)
                except RayTaskError as err:
                    # The worker loop raised (e.g. a replacement that came up after the last round): the job's
                    # own state says how it ended, so the driver goes on watching instead of dying with it.
                    log.warning("worker of replica %d ended with an error: %s", replica, err.cause or err)
            settle = not self.runs
            events, state, message = get(self.coordinator.events_since.remote(seen, settle), 90)
            seen += len(events)
            for event in events:
                for listener in listeners:
                    listener(event)
            if stop.is_set():
                log.warning("stopping: final checkpoint at %s", get(self.coordinator.stop.remote("stopped"), 60))
                stop.clear()
        return JobState(state), message

    def replace(self, replica: int, err: Exception) -> None:
        log.warning("worker actor of replica %d died (%s): starting a replacement", replica, type(err).__name__)
        get(self.coordinator.drop_replica.remote(replica), 60)
        state, _ = get(self.coordinator.status.remote(), 60)
        if not JobState(state).terminal:
            self.replacements += 1
            self.start_worker(replica)

    def close(self) -> None:
        for actor in [*self.workers.values(), self.coordinator]:
            ray.kill(actor)
        remove_placement_group(self.pg)


def run_ray(spec: JobSpec, run_dir: Path, listeners: list[Listener], resume: bool = False) -> tuple[JobState, str]:
    if not ray.is_initialized():
        ray.init(address=spec.runtime.ray.address, log_to_driver=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_atomic_text(run_dir / "config.yaml", spec.to_yaml())
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    driver = RayDriver(spec, run_dir, resume)
    started = time.monotonic()
    try:
        state, message = driver.watch(listeners, stop)
    except KeyboardInterrupt:
        get(driver.coordinator.stop.remote("interrupted"), 60)
        raise
    finally:
        driver.close()
        signal.signal(signal.SIGTERM, previous)
    log.info(
        "ray job %s in %.1fs (%d replacement workers)", state.value, time.monotonic() - started, driver.replacements
    )
    return state, message
