"""The coordinator service with real processes on 127.0.0.1: equivalence with the in-process runtime,
a worker killed with -9, a coordinator killed with -9 and restarted on the same state directory."""

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
import torch
import yaml
from model_checks import assert_result_is_the_model, mean_of_last_replicas
from prometheus_client import REGISTRY
from safetensors.torch import load_file
from toy_models import TOY_CODE

from cluster.client import Endpoint, JobsClient
from cluster.local import run_local
from cluster.processes import run_processes, worker_command
from coordinator.events import read_events
from coordinator.server import CoordinatorServer
from protos.spec import resolve
from worker.workloads.trust import Trust

TESTS = Path(__file__).parent
REPO = TESTS.parent


def spec_dict(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "svc",
        "preset": "parle",
        "replicas": 3,
        "epochs": 1,
        "model": {"name": "toy_models:slow_mlp", "options": {"delay": 0.0}},
        "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 32},
        "optim": {"L": 2, "round_deadline_s": 60},
        "eval": {"every_epochs": 1, "train_subset": 128},
        "checkpoint": {"every_rounds": 4},
        "runtime": {"lease_s": 2},
    }
    raw.update(overrides)
    return raw


def start_worker(
    procs: list[subprocess.Popen[bytes]], address: str, job_id: str, name: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    cmd = worker_command(address, job_id, name, "--threads", "1", "--reconnect-s", "60", *TOY_CODE, *extra)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    procs.append(proc)
    return proc


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(240)
def test_three_worker_processes_match_the_in_process_runtime(tmp_path: Path, worker_env: dict[str, str]) -> None:
    spec = resolve(spec_dict(model={"name": "toy_models:mlp", "options": {"dropout": 0.2}}))
    assert run_local(spec, tmp_path / "local").state.value == "succeeded"
    state, message = run_processes(spec, tmp_path / "procs", 3, [])
    assert state.value == "succeeded", message
    a = load_file(str(tmp_path / "local" / "reference.safetensors"))["reference"]
    b = load_file(str(tmp_path / "procs" / "reference.safetensors"))["reference"]
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    halfway = load_file(str(tmp_path / "procs" / "checkpoints" / "ckpt-000000004" / "tensors.safetensors"))
    assert float((a - halfway["reference"]).abs().max()) > 1e-3  # it trained
    assert_result_is_the_model(tmp_path / "procs", spec)


def _events(job_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(job_dir / "metrics.jsonl") if e["kind"] == kind]


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.timeout(240)
def test_killed_worker_drops_out_and_a_new_one_joins_from_the_reference(
    tmp_path: Path, worker_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    raw = spec_dict(epochs=16, model={"name": "toy_models:slow_mlp", "options": {"delay": 0.05}})
    with CoordinatorServer(tmp_path / "state") as server:
        job_id = server.manager.submit(resolve(raw))
        job = server.manager.job(job_id)
        workers = [
            start_worker(procs, server.address, job_id, f"w{i}", worker_env, "--replica", str(i)) for i in range(3)
        ]
        wait_for(lambda: job.round >= 6, 90, "round 6")
        workers[1].send_signal(signal.SIGKILL)
        killed_at = job.round
        wait_for(lambda: job.round >= killed_at + 4, 60, "rounds after the kill")
        start_worker(procs, server.address, job_id, "late", worker_env)
        wait_for(lambda: job.live_workers == 3, 60, "the new worker")
        assert job.round < job.schedule.total_rounds - 2  # it joined a running job
        assert job.wait(timeout=150).value == "succeeded", job.message
        job_dir = server.manager.job_dir(job_id)
    members = _events(job_dir, "member")
    assert [m["event"] for m in members].count("lapse") == 1
    joins = [m for m in members if m["event"] == "join"]
    assert len(joins) == 4 and joins[-1]["start"] == "reference" and joins[-1]["replica"] == 1
    rounds = _events(job_dir, "round")
    assert [r["round"] for r in rounds] == list(range(128))
    after_kill = rounds[killed_at : killed_at + 3]
    assert min(r["workers"] for r in after_kill) == 2  # the round closed on the live members
    assert max(r["round_seconds"] for r in after_kill) < 2 + 5  # within the lease (2 s) and the reaper's tick
    assert rounds[-1]["workers"] == 3  # the newcomer contributes
    assert _sample("parle_membership_events_total", {"job_id": job_id, "event": "lapse"}) == 1
    assert _sample("parle_membership_events_total", {"job_id": job_id, "event": "join"}) == 4


@pytest.mark.timeout(300)
def test_coordinator_killed_and_restarted_resumes_at_its_round(
    tmp_path: Path, worker_env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> None:
    port, state = free_port(), tmp_path / "state"
    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "cluster.cli", "coordinator", "--listen", address, "--state-dir", str(state)]

    def start_coordinator() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=worker_env, cwd=REPO)
        procs.append(proc)
        return proc

    coordinator = start_coordinator()
    raw = spec_dict(epochs=4, model={"name": "toy_models:slow_mlp", "options": {"delay": 0.03}})
    with JobsClient(Endpoint(address)) as client:
        wait_for(lambda: _reachable(client), 60, "the coordinator")
        job_id = client.submit(yaml.safe_dump(raw))
        for i in range(3):
            start_worker(procs, address, job_id, f"w{i}", worker_env, "--replica", str(i))
        job_dir = state / "jobs" / job_id
        wait_for(lambda: (job_dir / "checkpoints" / "ckpt-000000008").exists(), 120, "checkpoint 8")
        wait_for(lambda: len(_events(job_dir, "round")) >= 10, 60, "round 10")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        rounds_before_kill = len(_events(job_dir, "round"))
        start_coordinator()
        wait_for(lambda: _state(client, job_id) in ("succeeded", "failed"), 200, "the job to finish")
        assert _state(client, job_id) == "succeeded"
    rounds = [r["round"] for r in _events(job_dir, "round")]
    assert rounds == list(range(32))  # every round once: resumed at the round it was in, nothing lost
    assert rounds_before_kill >= 10
    rejoined = [m for m in _events(job_dir, "member") if m["event"] == "join" and m["start"] == "offer"]
    assert sorted(m["replica"] for m in rejoined) == [0, 1, 2]  # the workers came back with their replicas
    assert (job_dir / "reference.safetensors").is_file()


def _reachable(client: JobsClient) -> bool:
    try:
        client.jobs()
        return True
    except Exception:
        return False


def _state(client: JobsClient, job_id: str) -> str:
    from cluster.client import describe

    try:
        return str(describe(client.get(job_id))["state"])
    except Exception:
        return "unreachable"


@pytest.mark.timeout(120)
def test_client_commands_submit_watch_download_plot_cancel(
    tmp_path: Path, worker_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from cluster.cli import main
    from worker.loop import WorkerLoop
    from worker.transports.grpc import GrpcTransport

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec_dict(replicas=1, model={"name": "toy_models:mlp"})))
    with CoordinatorServer(tmp_path / "state") as server:
        flags = ["--coordinator", server.address]
        assert main(["submit", str(config), *flags]) == 0
        job_id = capsys.readouterr().out.strip()
        transport = GrpcTransport(server.address, job_id=job_id)
        worker = threading.Thread(target=WorkerLoop(transport, "w0", trust=Trust(("toy_models",))).run)
        worker.start()
        assert main(["status", job_id, "--watch", *flags]) == 0  # streams until the job ends
        watched = capsys.readouterr().out
        worker.join(timeout=60)
        transport.close()
        assert "round 7 " in watched and "eval round 7" in watched and "state 3" in watched  # 3: SUCCEEDED
        assert main(["jobs", *flags]) == 0
        assert job_id in capsys.readouterr().out
        assert main(["download", job_id, "-o", str(tmp_path / "ref.safetensors"), *flags]) == 0
        downloaded = load_file(str(tmp_path / "ref.safetensors"))["reference"]
        assert torch.allclose(downloaded, mean_of_last_replicas(server.manager.job_dir(job_id), 1), atol=1e-6)
        assert main(["plot", job_id, "-o", str(tmp_path / "c.png"), *flags]) == 0
        capsys.readouterr()
        assert (tmp_path / "c.png").stat().st_size > 10_000
        assert main(["submit", str(config), *flags]) == 0
        second = capsys.readouterr().out.strip()
        assert main(["cancel", second, *flags]) == 0
        assert '"state": "cancelled"' in capsys.readouterr().out
        assert main(["status", "no-such-job", *flags]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_pool_workers_serve_several_jobs_with_compressed_exchanges(tmp_path: Path, worker_env: dict[str, str]) -> None:
    """Two jobs at once, two pool workers (no --job): each job gets the worker it needs, bf16 on the wire."""
    import threading

    from worker.loop import WorkerLoop
    from worker.transports.grpc import GrpcTransport

    raw = spec_dict(replicas=1, model={"name": "toy_models:mlp"}, runtime={"compression": "bf16", "lease_s": 5})
    with CoordinatorServer(tmp_path / "state") as server:
        jobs = [server.manager.job(server.manager.submit(resolve({**raw, "name": name}))) for name in ("a", "b")]
        loops, threads = [], []
        for i in range(2):
            transport = GrpcTransport(server.address)
            loop = WorkerLoop(transport, f"pool{i}", serve_forever=True, trust=Trust(("toy_models",)))
            loops.append((loop, transport))
            threads.append(threading.Thread(target=loop.run, daemon=True))
            threads[-1].start()
        try:
            for job in jobs:
                assert job.wait(timeout=120).value == "succeeded", job.message
        finally:
            for loop, _ in loops:
                loop.stop()
            for thread in threads:
                thread.join(timeout=30)
            for _, transport in loops:
                transport.close()
        assert sum(loop.joins for loop, _ in loops) == 2  # one worker per job, no job joined twice
        for job in jobs:
            reference = load_file(str(job.directory / "reference.safetensors"))["reference"]
            assert reference.dtype == torch.float32  # bf16 only on the wire
            tests = [e for e in _events(job.directory, "eval") if e["split"] == "test"]
            assert tests and tests[-1]["error"] < 0.5


@pytest.mark.timeout(180)
def test_a_job_whose_data_cannot_load_fails_and_the_pool_worker_serves_the_next(
    tmp_path: Path, worker_env: dict[str, str]
) -> None:
    """Bad data is the job's failure: FAILED with the worker's one-line message; the worker lives on."""
    import threading

    from worker.loop import WorkerLoop
    from worker.transports.grpc import GrpcTransport

    missing = tmp_path / "no-such-idx-dir"
    bad = spec_dict(name="bad", replicas=1, data={"name": "idx", "root": str(missing), "batch_size": 32})
    good = spec_dict(name="good", replicas=1, model={"name": "toy_models:mlp"})
    with CoordinatorServer(tmp_path / "state") as server:
        bad_job = server.manager.job(server.manager.submit(resolve(bad)))
        good_job = server.manager.job(server.manager.submit(resolve(good)))
        transport = GrpcTransport(server.address)
        loop = WorkerLoop(transport, "pool", serve_forever=True, trust=Trust(("toy_models",), (tmp_path,)))
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        try:
            assert bad_job.wait(timeout=60).value == "failed"
            assert str(missing) in bad_job.message and "replica 0" in bad_job.message, bad_job.message
            assert good_job.wait(timeout=120).value == "succeeded", good_job.message
        finally:
            loop.stop()
            thread.join(timeout=30)
            transport.close()
        assert loop.joins == 2
