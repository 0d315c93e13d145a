"""The Ray runtime against a real local Ray head started here on loopback (and stopped afterwards):
the shared transport suite, `ray job submit` / `ray job stop`, equivalence with the in-process runtime,
a killed worker actor, and an impossible resource request."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml
from model_checks import assert_result_is_the_model
from safetensors.torch import load_file
from transport_suite import CHECKS, Harness

from cluster.local import run_local
from cluster.ray_runtime import CoordinatorActor, RayDriver, RayResourceError, run_ray
from coordinator.checkpoint import CheckpointStore
from coordinator.events import read_events
from protos.spec import JobSpec, resolve
from worker.transports import WorkerTransport
from worker.transports.ray import RayTransport

TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, Any]]:
    env = {
        **os.environ,  # with conftest.py's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback) and no auth
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # job entrypoints use the PATH of `ray start`
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    port, dashboard = _free_port(), _free_port()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
             "--object-store-memory", str(300 << 20), "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, env=env, check=True, timeout=240, capture_output=True)
    try:
        ray.init(address=f"127.0.0.1:{port}", runtime_env={"env_vars": {"PYTHONPATH": env["PYTHONPATH"]}})
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, timeout=120, capture_output=True)


def job_dict(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "rayjob",
        "preset": "parle",
        "replicas": 2,
        "epochs": 1,
        "model": {"name": "toy_models:mlp", "options": {"dropout": 0.2}},
        "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 32},
        "optim": {"L": 2, "round_deadline_s": 60},
        "eval": {"every_epochs": 1, "train_subset": 128},
        "checkpoint": {"every_rounds": 4},
        "runtime": {"ray": {"num_cpus": 0.5, "schedule_timeout_s": 30}},
    }
    raw.update(overrides)
    return raw


# ----- the shared transport suite ------------------------------------------------------------------


class RayJobProxy:
    """What the suite reads of a job, fetched from its coordinator actor."""

    def __init__(self, actor: Any, spec: JobSpec, directory: Path) -> None:
        self.actor, self.spec, self.job_id = actor, spec, directory.name
        self.store = CheckpointStore(directory / "checkpoints")

    def _inspect(self, key: str) -> Any:
        return ray.get(self.actor.inspect.remote(), timeout=30)[key]

    center = property(lambda self: self._inspect("center"))
    model = property(lambda self: self._inspect("model"))
    round = property(lambda self: self._inspect("round"))
    live_workers = property(lambda self: self._inspect("live_workers"))

    def cancel(self) -> None:
        ray.get(self.actor.cancel.remote(), timeout=30)

    def flush(self) -> None:
        ray.get(self.actor.flush.remote(), timeout=60)


class RayHarness:
    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0

    def open_job(self, spec: JobSpec) -> Any:
        self.count += 1
        directory = self.root / f"job{self.count}"
        actor = CoordinatorActor.options(max_concurrency=16).remote(directory.name, spec, str(directory), False, 0)  # type: ignore[attr-defined]
        return RayJobProxy(actor, spec, directory)

    def transport(self, job: Any) -> WorkerTransport:
        return RayTransport(job.actor, timeout_s=30)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_ray_transport_passes_the_shared_suite(
    ray_head: dict[str, Any], tmp_path: Path, check: Callable[[Harness], None]
) -> None:
    check(RayHarness(tmp_path))


# ----- the runtime ---------------------------------------------------------------------------------


def test_ray_runtime_matches_the_in_process_runtime(ray_head: dict[str, Any], tmp_path: Path) -> None:
    spec = resolve(job_dict())
    assert run_local(spec, tmp_path / "local").state.value == "succeeded"
    state, message = run_ray(spec, tmp_path / "ray", [])
    assert state.value == "succeeded", message
    a = load_file(str(tmp_path / "local" / "reference.safetensors"))["reference"]
    b = load_file(str(tmp_path / "ray" / "reference.safetensors"))["reference"]
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    assert_result_is_the_model(tmp_path / "ray", spec)


def _free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 all free."""
    while True:
        base = _free_port()
        try:
            for offset in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_killed_worker_actor_is_replaced_and_joins_from_the_reference(ray_head: dict[str, Any], tmp_path: Path) -> None:
    port = _free_ports(3)
    # Long enough (48 rounds of >= 0.3 s) for a replacement actor to start on a busy machine before the end.
    raw = job_dict(epochs=6, model={"name": "toy_models:slow_mlp", "options": {"delay": 0.15}})
    raw["runtime"]["ray"]["metrics_port"] = port
    spec = resolve(raw)
    run_dir = tmp_path / "run"
    driver = RayDriver(spec, run_dir)
    outcome: list[Any] = []
    watcher = threading.Thread(target=lambda: outcome.append(driver.watch([], threading.Event())))
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while len([e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "round"]) < 4:
            assert time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.1)
        # the Ray job exports the project's metrics: the coordinator actor's and each worker actor's
        assert 'parle_rounds_total{job_id="run"}' in _scrape(port)
        for replica in (0, 1):
            assert 'parle_worker_rounds_total{job_id="run"}' in _scrape(port + 1 + replica)
        ray.kill(driver.workers[1])
        watcher.join(timeout=200)
    finally:
        driver.close()
    state, message = outcome[0]
    assert state.value == "succeeded", message
    assert driver.replacements == 1
    members = [e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "member"]
    lost = [m for m in members if m["event"] == "lost"]
    assert [m["replica"] for m in lost] == [1]
    rejoin = [m for m in members if m["event"] == "join"][-1]
    assert rejoin["replica"] == 1 and rejoin["start"] == "reference"
    rounds = [e["round"] for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "round"]
    assert rounds == list(range(48))


def test_impossible_resource_request_fails_fast_with_a_clear_message(ray_head: dict[str, Any], tmp_path: Path) -> None:
    too_big = resolve(job_dict(runtime={"ray": {"num_cpus": 64}}))
    started = time.monotonic()
    with pytest.raises(RayResourceError, match=r"num_cpus 64.*CPU 128 \(the cluster has 4\)"):
        run_ray(too_big, tmp_path / "a", [])
    unplaceable = resolve(job_dict(runtime={"ray": {"placement": "STRICT_SPREAD", "schedule_timeout_s": 3}}))
    with pytest.raises(RayResourceError, match="STRICT_SPREAD"):  # two bundles on two nodes; there is one
        run_ray(unplaceable, tmp_path / "b", [])
    assert time.monotonic() - started < 30


def _ray_cli(ray_head: dict[str, Any], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "ray"), "job", *args]
    return subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_trains_and_ray_job_stop_checkpoints(ray_head: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(TESTS / "toy_models.py", work / "toy_models.py")
    (work / "job.yaml").write_text(yaml.safe_dump(job_dict()))
    run_dir = tmp_path / "submitted"
    address = ["--address", ray_head["dashboard"]]
    done = _ray_cli(ray_head, "submit", *address, "--working-dir", str(work), "--",
                    "parle", "train", "job.yaml", "--runtime", "ray", "--run-dir", str(run_dir))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test error" in done.stdout and "succeeded" in done.stdout
    assert load_file(str(run_dir / "reference.safetensors"))["reference"].numel() > 1000

    slow = job_dict(epochs=50, model={"name": "toy_models:slow_mlp", "options": {"delay": 0.05}})
    (work / "slow.yaml").write_text(yaml.safe_dump(slow))
    stopped_dir = tmp_path / "stopped"
    submitted = _ray_cli(ray_head, "submit", *address, "--no-wait", "--working-dir", str(work), "--",
                         "parle", "train", "slow.yaml", "--runtime", "ray", "--run-dir", str(stopped_dir))  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = next(w for w in submitted.stdout.replace("'", " ").split() if w.startswith("raysubmit_"))
    deadline = time.monotonic() + 180
    while len([e for e in read_events(stopped_dir / "metrics.jsonl") if e["kind"] == "round"]) < 6:
        assert time.monotonic() < deadline, _ray_cli(ray_head, "logs", *address, job_id).stdout[-3000:]
        time.sleep(0.2)
    assert _ray_cli(ray_head, "stop", *address, job_id).returncode == 0
    ckpt = CheckpointStore(stopped_dir / "checkpoints").latest()
    rounds = [e["round"] for e in read_events(stopped_dir / "metrics.jsonl") if e["kind"] == "round"]
    assert ckpt is not None and ckpt.round >= rounds[-1]  # the final checkpoint holds the last closed round
    status = _ray_cli(ray_head, "status", *address, job_id).stdout
    assert "STOPPED" in status or "stopped" in status.lower(), status
    assert json.loads((ckpt.path / "manifest.json").read_text())["round"] == ckpt.round
