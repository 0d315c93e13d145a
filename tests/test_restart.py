"""A ``parle coordinator`` killed with -9 and restarted on its state directory while its worker processes
live: the job resumes at the round it was in (no closed round lost), the workers offering their replicas
back, and ends with the model an uninterrupted run makes. A replica whose worker died too comes back
from the last checkpoint."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from toy_models import TOY_CODE

from cluster.client import Endpoint, JobsClient
from cluster.processes import run_processes, worker_command
from coordinator.events import read_events
from protos import parle_pb2 as pb
from protos.spec import resolve

TESTS = Path(__file__).parent
REPO = TESTS.parent
KILLS = 5


def spec_dict(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "restart",
        "preset": "parle",
        "replicas": 3,
        "epochs": 4,  # 8 rounds an epoch
        # Dropout: the replicas' random streams must come back exactly too.
        "model": {"name": "toy_models:slow_mlp", "options": {"delay": 0.01, "dropout": 0.2}},
        "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 32},
        "optim": {"L": 2, "round_deadline_s": 60},
        "eval": {"every_epochs": 1, "train_subset": 128},
        "checkpoint": {"every_rounds": 4},
        "runtime": {"lease_s": 5},
    }
    raw.update(overrides)
    return raw


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def events(job_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(job_dir / "metrics.jsonl") if e["kind"] == kind]


def last_round(job_dir: Path) -> int:
    rounds = events(job_dir, "round")
    return rounds[-1]["round"] if rounds else -1


def reachable(client: JobsClient) -> bool:
    try:
        client.jobs()
        return True
    except Exception:
        return False


class Service:
    """A ``parle coordinator`` process on a fixed port and state directory, restartable."""

    def __init__(self, state: Path, env: dict[str, str], procs: list[subprocess.Popen[bytes]]) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.cmd = [sys.executable, "-m", "cluster.cli", "coordinator", "--listen", self.address]
        self.cmd += ["--state-dir", str(state)]
        self.state = state
        self.env, self.procs = env, procs
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stderr=subprocess.DEVNULL)
        self.procs.append(self.proc)
        return self.proc

    def submit(self, client: JobsClient, raw: dict[str, Any]) -> tuple[str, Path]:
        """Submit once the coordinator answers; the job's id and run directory."""
        wait_for(lambda: reachable(client), 60, "the coordinator")
        job_id = client.submit(yaml.safe_dump(raw))
        return job_id, self.state / "jobs" / job_id

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def worker(self, job_id: str, replica: int) -> subprocess.Popen[bytes]:
        cmd = worker_command(self.address, job_id, f"w{replica}", "--threads", "1", "--reconnect-s", "60", *TOY_CODE)
        proc = subprocess.Popen([*cmd, "--replica", str(replica)], env=self.env, cwd=REPO)
        self.procs.append(proc)
        return proc

    def pool_worker(self, name: str) -> subprocess.Popen[bytes]:
        """A pool worker: serves whatever job the coordinator assigns it."""
        cmd = [sys.executable, "-m", "cluster.cli", "worker", "--coordinator", self.address, "--name", name]
        proc = subprocess.Popen([*cmd, "--threads", "1", *TOY_CODE], env=self.env, cwd=REPO)
        self.procs.append(proc)
        return proc


def resumes(job_dir: Path) -> list[dict[str, Any]]:
    return events(job_dir, "resume")


def rejoined(job_dir: Path) -> list[tuple[int, str]]:
    """(replica, where its state came from) of each join after the first three, by replica."""
    joins = [m for m in events(job_dir, "member") if m["event"] == "join"][3:]
    return sorted((m["replica"], m["start"]) for m in joins)


@pytest.mark.timeout(240)
def test_coordinator_killed_at_five_rounds_resumes_each_at_its_round_and_ends_with_the_same_model(
    tmp_path: Path, worker_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    raw = spec_dict()
    spec = resolve(raw)
    state, message = run_processes(spec, tmp_path / "uninterrupted", 3, [])  # same seed, nothing killed
    assert state.value == "succeeded", message
    total = 32

    service = Service(tmp_path / "state", worker_env, procs)
    with JobsClient(Endpoint(service.address)) as client:
        job_id, job_dir = service.submit(client, raw)
        workers = [service.worker(job_id, i) for i in range(3)]
        killed_at: list[int] = []
        target = 2
        for kill in range(KILLS):
            wait_for(lambda: last_round(job_dir) >= target, 90, f"round {target}")  # noqa: B023
            service.kill()
            closed = last_round(job_dir)  # what the job had closed when it died
            killed_at.append(closed + 1)
            service.start()
            wait_for(lambda: len(resumes(job_dir)) > kill, 60, "the restarted coordinator")  # noqa: B023
            assert resumes(job_dir)[-1] == {**resumes(job_dir)[-1], "round": closed + 1, "from": "round-state"}
            wait_for(lambda: reachable(client), 60, "the coordinator")
            assert client.get(job_id).round >= closed + 1  # Get agrees: no closed round lost
            target = closed + 1 + 3
        assert all(p.poll() is None for p in workers)  # the same worker processes all along
        wait_for(lambda: (job_dir / "reference.safetensors").is_file(), 120, "the end of the job")
        wait_for(lambda: client.get(job_id).state == pb.JOB_STATE_SUCCEEDED, 30, "the job to succeed")
    assert len(set(killed_at)) == KILLS and max(killed_at) < total, killed_at

    # Every round closed once, with the same loss as without the kills: nothing lost, nothing run twice.
    rounds = events(job_dir, "round")
    reference_rounds = events(tmp_path / "uninterrupted", "round")
    assert [r["round"] for r in rounds] == list(range(total))
    for ours, theirs in zip(rounds, reference_rounds, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-6), ours["round"]
    evals = [(e["round"], e["split"]) for e in events(job_dir, "eval")]
    assert evals == [(e["round"], e["split"]) for e in events(tmp_path / "uninterrupted", "eval")] and evals
    joins = [m for m in events(job_dir, "member") if m["event"] == "join"]
    assert sum(m["start"] == "offer" for m in joins) == 3 * KILLS  # every worker came back with its replica
    for name in ("reference.safetensors", "final.safetensors"):
        ours, theirs = load_file(str(job_dir / name)), load_file(str(tmp_path / "uninterrupted" / name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            gap = float((ours[key].double() - theirs[key].double()).abs().max()) if ours[key].numel() else 0.0
            assert gap <= 1e-6, (name, key, gap)
    assert float((load_file(str(job_dir / "reference.safetensors"))["reference"]).abs().max()) > 0  # trained


@pytest.mark.timeout(180)
def test_a_replica_whose_worker_died_with_the_coordinator_comes_back_from_the_checkpoint(
    tmp_path: Path, worker_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    raw = spec_dict(epochs=3)  # 24 rounds
    service = Service(tmp_path / "state", worker_env, procs)
    with JobsClient(Endpoint(service.address)) as client:
        job_id, job_dir = service.submit(client, raw)
        workers = [service.worker(job_id, i) for i in range(3)]
        wait_for(lambda: last_round(job_dir) >= 10, 90, "round 10")
        workers[2].send_signal(signal.SIGKILL)
        service.kill()
        closed = last_round(job_dir)
        workers[2].wait(timeout=10)
        service.start()
        service.worker(job_id, 2)  # a new process for replica 2: it holds nothing
        wait_for(lambda: (job_dir / "reference.safetensors").is_file(), 120, "the end of the job")
    assert resumes(job_dir)[-1]["round"] == closed + 1
    rounds = [r["round"] for r in events(job_dir, "round")]
    assert rounds == list(range(24))
    assert rejoined(job_dir) == [(0, "offer"), (1, "offer"), (2, "checkpoint")]


@pytest.mark.timeout(180)
def test_pool_workers_are_taken_back_with_their_replicas_by_a_restarted_coordinator(
    tmp_path: Path, worker_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    """Pool workers (the compose deployment's) are not pinned to a job; after a restart they rejoin the job
    they were in, offering their replicas, and the job resumes at its round."""
    raw = spec_dict(epochs=2)  # 16 rounds
    service = Service(tmp_path / "state", worker_env, procs)
    with JobsClient(Endpoint(service.address)) as client:
        _, job_dir = service.submit(client, raw)
        workers = [service.pool_worker(f"pool{i}") for i in range(3)]
        wait_for(lambda: last_round(job_dir) >= 5, 90, "round 5")
        service.kill()
        closed = last_round(job_dir)
        service.start()
        wait_for(lambda: (job_dir / "reference.safetensors").is_file(), 120, "the end of the job")
        assert all(p.poll() is None for p in workers)  # pool workers live on for the next job
    assert resumes(job_dir)[-1] == {**resumes(job_dir)[-1], "round": closed + 1, "from": "round-state"}
    assert [r["round"] for r in events(job_dir, "round")] == list(range(16))  # none lost, none run twice
    assert rejoined(job_dir) == [(0, "offer"), (1, "offer"), (2, "offer")]
