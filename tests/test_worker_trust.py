"""What a pool worker agrees to run (``--allow-code``, ``--data-dir``), and a model that does not import:
each is the job's failure, with a message naming the problem and the flag, and the same worker process
goes on to finish the next job. Real ``parle coordinator`` and ``parle worker`` processes on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.client import Endpoint, JobsClient
from cluster.processes import reap, worker_options
from protos import parle_pb2 as pb
from protos.spec import resolve
from worker.workloads.errors import WorkloadError
from worker.workloads.trust import SYSTEM_DATA_DIRS, Trust

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def job(name: str, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": name,
        "preset": "parle",
        "replicas": 1,
        "epochs": 1000,
        "max_rounds": 2,
        "model": {"name": "lenet"},
        "data": {"name": "synthetic", "synthetic_size": 64, "batch_size": 16},
        "optim": {"L": 1},
        "eval": {"every_epochs": 1e12},
    }
    return {**raw, **changes}


# ----------------------------------------------------------------------------------------------- pure


def test_trust_decisions(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    trust = Trust.of(["mypkg.", "other.sub"], [allowed])
    assert trust.code == ("mypkg", "other.sub")
    trust.check(resolve(job("ok", model={"name": "mypkg.models:net"}, data={"name": "mypkg:make"})))
    trust.check(resolve(job("ok", data={"name": "idx", "root": str(allowed / "x")})))
    trust.check(resolve(job("builtin", model={"name": "wrn"}, data={"name": "fashion-mnist"})))
    with pytest.raises(WorkloadError, match=r"^model\.name: mypkgx:net: .*--allow-code mypkgx"):
        trust.check(resolve(job("no", model={"name": "mypkgx:net"})))
    with pytest.raises(WorkloadError, match=r"^data\.name: other:make: .*--allow-code other"):
        trust.check(resolve(job("no", data={"name": "other:make"})))
    with pytest.raises(WorkloadError, match=rf"^data\.root: {allowed / 'link'} \(resolves to {outside}\).*--data-dir"):
        trust.check(resolve(job("no", data={"name": "idx", "root": str(allowed / "link")})))
    with pytest.raises(WorkloadError, match=r"^data\.root: .*\.\./outside.*--data-dir"):
        trust.check(resolve(job("no", data={"name": "idx", "root": str(allowed / ".." / "outside")})))
    assert Trust().code == () and Trust.of(None, None).data_dirs == SYSTEM_DATA_DIRS


def test_own_config_is_trusted_and_passed_to_worker_processes(tmp_path: Path) -> None:
    spec = resolve(job("own", model={"name": "toy_models:mlp"}, data={"name": "idx", "root": str(tmp_path)}))
    Trust.for_spec(spec).check(spec)
    flags = worker_options(spec, 1, 0, 1)[0]
    assert flags[flags.index("--allow-code") + 1] == "toy_models"
    assert str(tmp_path.resolve()) in flags


# ------------------------------------------------------------------------------------- real processes


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """A ``parle`` process; its log (stderr) goes to ``log``, stdout is read by the test."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    reap(started, grace_s=15)


def wait_terminal(client: JobsClient, job_id: str, timeout: float) -> pb.JobInfo:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        info = client.get(job_id)
        if info.state in TERMINAL:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {pb.JobState.Name(info.state)} after {timeout}s: {info.message}")


@pytest.mark.timeout(300)
def test_refused_and_unimportable_jobs_fail_and_the_same_worker_finishes_the_next(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    allowed, outside = tmp_path / "data", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = ["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]
    coordinator = start(argv, env, tmp_path / "coordinator.log")
    procs.append(coordinator)
    assert coordinator.stdout is not None
    first = coordinator.stdout.readline()
    assert "listening on" in first, first
    address = first.rsplit(" ", 1)[1].strip()
    jobs = [
        # toy_models imports fine on the worker's path: only the flag stops it
        ("not allowed", job("code", model={"name": "toy_models:mlp"}), ["model.name: toy_models:mlp", "--allow-code"]),
        (
            "does not import",
            job("import", model={"name": "no_such_pkg_zz.models:net"}),
            ["model.name: no_such_pkg_zz.models:net: cannot import no_such_pkg_zz.models", "ModuleNotFoundError"],
        ),
        (
            "data outside",
            job("data", data={"name": "idx", "root": str(allowed / "escape"), "batch_size": 16}),
            [f"data.root: {allowed / 'escape'} (resolves to {outside})", "--data-dir"],
        ),
    ]
    with JobsClient(Endpoint(address)) as client:
        ids = [client.submit(yaml.safe_dump(raw)) for _, raw, _ in jobs]
        good = client.submit(yaml.safe_dump(job("good")))
        worker = start(
            [
                *("worker", "--coordinator", address, "--threads", "1", "--reconnect-s", "60"),
                *("--allow-code", "no_such_pkg_zz", "--data-dir", str(allowed)),
            ],
            env,
            tmp_path / "worker.log",
        )
        procs.append(worker)
        for job_id, (what, _, expected) in zip(ids, jobs, strict=True):
            info = wait_terminal(client, job_id, 120)
            assert info.state == pb.JOB_STATE_FAILED, (what, info.message)
            for part in expected:
                assert part in info.message, (what, part, info.message)
        info = wait_terminal(client, good, 180)
        assert info.state == pb.JOB_STATE_SUCCEEDED, info.message
        assert worker.poll() is None, "the pool worker must live on"
