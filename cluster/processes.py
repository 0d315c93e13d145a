"""`parle train CONFIG --workers N`: a coordinator on a free loopback port in this process and N
`parle worker` processes, all stopped when the job ends or on Ctrl-C. The run directory is the job's.
Worker i asks for replica i and runs on ``replica_device(spec.device, i, G)``: with ``device: cuda``, the
workers spread over the G visible GPUs (i mod G)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.local import replica_device, visible_gpus
from coordinator.job import JobState, Listener
from coordinator.server import CoordinatorServer
from protos.spec import JobSpec
from worker.workloads.trust import Trust

log = logging.getLogger(__name__)


def worker_command(address: str, job_id: str, name: str, *options: str) -> list[str]:
    """`parle worker` for one job, run with this interpreter; ``options`` are further worker flags."""
    command = [sys.executable, "-m", "cluster.cli", "worker", "--coordinator", address, "--job", job_id]
    return [*command, "--name", name, *options]


def worker_options(spec: JobSpec, workers: int, device_count: int, threads: int) -> list[tuple[str, ...]]:
    """Each worker process's flags: its replica, its device (``replica_device``), its CPU threads, and the
    user code and data directory of this config (one's own config is trusted: ``Trust.for_spec``)."""
    trust = tuple(Trust.for_spec(spec).flags())
    return [
        (
            *("--replica", str(i), "--device", replica_device(spec.device, i, device_count)),
            *("--threads", str(threads), *trust),
        )
        for i in range(workers)
    ]


def reap(procs: Sequence[subprocess.Popen[Any]], grace_s: float = 10.0) -> None:
    """Terminate, wait (``grace_s`` each), then kill whatever is left, in the given order: no orphans."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_processes(spec: JobSpec, run_dir: Path, workers: int, listeners: list[Listener]) -> tuple[JobState, str]:
    token = secrets.token_hex(16)
    env = {**os.environ, "PARLE_TOKEN": token}
    threads = max(1, (os.cpu_count() or 1) // workers)
    options = worker_options(spec, workers, visible_gpus() if spec.device != "cpu" else 0, threads)
    server = CoordinatorServer(run_dir / ".coordinator", listen="127.0.0.1:0", token=token)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        job_id = server.manager.submit(spec, directory=run_dir)
        job = server.manager.job(job_id)
        job.listeners.extend(listeners)
        log.info("job %s on %s with %d worker processes", job_id, server.address, workers)
        for i, flags in enumerate(options):
            procs.append(subprocess.Popen(worker_command(server.address, job_id, f"worker-{i}", *flags), env=env))
        while job.wait(timeout=1.0) not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            if all(p.poll() is not None for p in procs):
                job.flush()  # the workers are done: the job's last writes (its reference) come before its end
                if not job.state.terminal:
                    job.abort("every worker process exited before the job finished")
        return job.state, job.message
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            server.manager.cancel(job_id)
        raise
    finally:
        reap(procs)
        server.close()
