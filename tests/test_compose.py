"""docker-compose.yml built and run in a real Docker engine with the real Compose v2 (`make test-compose`).

The images are made on this machine without a registry (scripts/compose_test_env.sh: a debootstrap base,
a wheelhouse from the host's pip, Prometheus from Debian's package, deploy/Dockerfile on top), then:
coordinator, 3 workers and Prometheus up and healthy; the example job, shortened with --set, survives a
`docker kill`ed worker and a `docker kill`ed coordinator (each started again as a crashed host would be);
Prometheus scrapes the coordinator and every worker through compose DNS, has the job's rounds, evaluates
the rules and every dashboard query; `--scale worker=5` gives 5 scraped workers; the state volume keeps the
job across `docker compose restart coordinator`; everything runs as a non-root user. `docker compose down
-v` always runs at the end, and a dockerd this test started is stopped.

Runs only when asked (PARLE_COMPOSE_TEST=1, set by `make test-compose`): it builds images and takes minutes.
It needs root or a running Docker engine; without them it skips, unless PARLE_REQUIRE_COMPOSE=1 (.ci/run),
which turns the skip into a failure. Progress goes to stdout (`make test-compose` runs pytest with -s).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "compose_test_env.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "parle.json"
PROJECT = "parle-compose-test"  # our own compose project: containers, volumes and network carry this prefix
PARLE_IMAGE = "parle-compose-test/parle:latest"
PROMETHEUS_IMAGE = "parle-compose-test/prometheus:latest"
# The example job, shortened: 24 of its 38 rounds, a checkpoint every 2 rounds so that the killed coordinator
# resumes close to where it died.
JOB = ["examples/parle.yaml", "--set", "max_rounds=24", "--set", "checkpoint.every_rounds=2"]
ROUNDS = 24
KILL_WORKER_AT, KILL_COORDINATOR_AT = 4, 10
TERMINAL = ("succeeded", "failed", "cancelled")

REQUESTED = os.environ.get("PARLE_COMPOSE_TEST") == "1"
REQUIRED = os.environ.get("PARLE_REQUIRE_COMPOSE") == "1"

if not (REQUESTED or REQUIRED):
    pytest.skip(
        "compose test: run by `make test-compose` (root or a Docker engine; builds images)", allow_module_level=True
    )

pytestmark = pytest.mark.timeout(1500)


def unavailable(reason: str) -> None:
    """Skip, or fail where the compose test is required (.ci/run)."""
    if REQUIRED:
        pytest.fail(f"compose test required (PARLE_REQUIRE_COMPOSE=1) but {reason}", pytrace=False)
    pytest.skip(f"compose test: {reason}")


def say(message: str) -> None:
    print(f"compose-test: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(value: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    """Poll until ``value()`` is truthy (exceptions count as not yet); returns it."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if result := value():
                return result
        except AssertionError:
            raise
        except Exception as err:  # e.g. the coordinator is down for a moment
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last: {last})" if last else "")
            )
        time.sleep(every)


@dataclass
class Stack:
    """The running compose project and what the tests learn about it."""

    env: dict[str, str]
    token: str
    coordinator_port: int
    prometheus_port: int
    started: float = field(default_factory=time.monotonic)
    report: list[str] = field(default_factory=list)
    job_id: str | None = None

    def note(self, line: str) -> None:
        say(line)
        self.report.append(line)

    def run(self, *cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        base = ["docker", "compose", "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
        return self.run(*base, "-p", PROJECT, *args, timeout=timeout, check=check)

    def containers(self, service: str) -> list[dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json", service).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["Name"])

    def healthy(self, service: str, count: int) -> bool:
        rows = self.containers(service)
        return len(rows) == count and all(r["State"] == "running" and r["Health"] == "healthy" for r in rows)

    # --- the coordinator, from this host through the published port ---

    def client(self, token: str | None = "") -> Any:
        from cluster.client import Endpoint, JobsClient

        return JobsClient(Endpoint(f"127.0.0.1:{self.coordinator_port}", self.token if token == "" else token), 10)

    def job_events(self) -> list[dict[str, Any]]:
        """The job's metrics.jsonl, read in the coordinator's container (its state volume)."""
        out = self.compose("exec", "-T", "coordinator", "cat", f"/state/jobs/{self.job_id}/metrics.jsonl", check=False)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip().endswith("}")]

    def job(self) -> dict[str, Any]:
        from cluster.client import describe

        assert self.job_id is not None
        with self.client() as client:
            return describe(client.get(self.job_id))

    # --- Prometheus, from this host through the published port ---

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=promql)["result"])

    def targets_up(self) -> dict[str, list[str]]:
        """Scrape job -> instances whose last scrape succeeded."""
        up: dict[str, list[str]] = {}
        for target in self.api("targets", state="active")["activeTargets"]:
            if target["health"] == "up":
                up.setdefault(target["labels"]["job"], []).append(target["labels"]["instance"])
        return {job: sorted(instances) for job, instances in up.items()}


def dashboard_queries() -> list[str]:
    """The PromQL of the dashboard's panels (its job variable's label_values() is Grafana's, not PromQL)."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return [e for e in exprs if not e.startswith("label_values(")]


# --- the Docker engine, the images, the project ---


def cache_dir() -> Path:
    if "PARLE_COMPOSE_CACHE" in os.environ:
        return Path(os.environ["PARLE_COMPOSE_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/parle-compose")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parle-compose"


def engine_answers(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def script(step: str, env: dict[str, str], timeout: float) -> list[str]:
    """Run one step of scripts/compose_test_env.sh, echoing its output; returns its lines."""
    lines: list[str] = []
    with subprocess.Popen(
        ["bash", str(SCRIPT), step], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            if "legacy builder is deprecated" in line or "BuildKit is currently disabled" in line:
                continue
            if line.strip() and not line.lstrip().startswith("environment-variable"):
                print(line, end="", flush=True)
                lines.append(line.rstrip())
            if time.monotonic() > deadline:
                proc.kill()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    assert rc == 0, f"scripts/compose_test_env.sh {step} failed ({rc}):\n" + "\n".join(lines[-30:])
    return lines


# Decided once for the module, so that a machine that cannot run it says so in one line.
if os.geteuid() != 0 and not engine_answers(dict(os.environ)):
    reason = "no Docker engine answers, and installing or starting one (dockerd) needs root"
    if REQUIRED:
        pytest.fail(f"compose test required (PARLE_REQUIRE_COMPOSE=1) but {reason}", pytrace=False)
    pytest.skip(f"compose test: {reason}", allow_module_level=True)


@contextlib.contextmanager
def docker_engine(env: dict[str, str], logs: Path) -> Iterator[None]:
    """The engine that answers, or a dockerd started here (root only) and stopped at the end."""
    if engine_answers(env):
        say("using the Docker engine that answers")
        yield
        return
    if os.geteuid() != 0:
        unavailable("no Docker engine answers, and installing or starting one (dockerd) needs root")
    script("packages", env, timeout=600)
    if engine_answers(env):  # the package's service may have started one
        yield
        return
    log = logs / "dockerd.log"
    say(f"starting dockerd (log: {log})")
    with log.open("ab") as out:
        dockerd = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        wait_for(lambda: dockerd.poll() is not None or engine_answers(env), 90, "dockerd to answer")
        assert dockerd.poll() is None, f"dockerd exited ({dockerd.returncode}); see {log}"
        say(f"dockerd (pid {dockerd.pid}) answers after {time.monotonic() - t0:.0f}s")
        yield
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait()
        say(f"stopped the dockerd this test started (exit {dockerd.returncode})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = time.monotonic()
    cache = cache_dir()
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("compose")
    token = secrets.token_hex(16)
    env_file = work / "parle.env"
    # The token (every call must carry it) and one torch thread per worker: 3-5 workers share 2 cores in CI.
    env_file.write_text(f"PARLE_TOKEN={token}\nOMP_NUM_THREADS=1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "PARLE_TOKEN", "PARLE_COORDINATOR"))}
    env.update(
        DOCKER_CONFIG=str(cache / "docker-config"),  # holds only the compose plugin; no credentials
        PARLE_COMPOSE_CACHE=str(cache),
        PARLE_IMAGE=PARLE_IMAGE,
        PARLE_PROMETHEUS_IMAGE=PROMETHEUS_IMAGE,
        PARLE_ENV_FILE=str(env_file),
        PARLE_COORDINATOR_PORT=str(free_port()),
        PARLE_PROMETHEUS_PORT=str(free_port()),
    )
    stack = Stack(env, token, int(env["PARLE_COORDINATOR_PORT"]), int(env["PARLE_PROMETHEUS_PORT"]), started)
    with docker_engine(env, cache / "logs"):
        script("plugin", env, timeout=60)
        t0 = time.monotonic()
        built = script("images", env, timeout=1200)
        stack.report += [line.removeprefix("compose-env: ") for line in built if re.search(r" in \d+s$", line)]
        stack.note(f"images ready in {time.monotonic() - t0:.0f}s")
        stack.compose("down", "--volumes", "--remove-orphans", timeout=120)  # leftovers of an interrupted run
        try:
            t0 = time.monotonic()
            up = ["up", "-d", "--no-build", "--pull", "never", "--wait", "--wait-timeout", "240"]
            stack.compose(*up, "coordinator", "worker", "prometheus", timeout=300)
            stack.note(f"coordinator, 3 workers and Prometheus up and healthy in {time.monotonic() - t0:.0f}s")
            yield stack
        finally:
            log = cache / "logs" / "compose-services.log"
            with contextlib.suppress(Exception):
                log.write_text(stack.compose("logs", "--no-color", "--timestamps", timeout=60, check=False).stdout)
            down = stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180, check=False)
            left = stack.run(
                "docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}", check=False
            )
            stack.note(f"docker compose down -v: exit {down.returncode}, containers left: {len(left.stdout.split())}")
            stack.note(f"service logs: {log}")
            stack.note(f"total {time.monotonic() - stack.started:.0f}s")
            print("\n--- compose test summary ---\n" + "\n".join(stack.report), flush=True)


# --- the tests, in the order they run ---


def test_services_are_healthy_run_as_non_root_and_require_the_token(stack: Stack) -> None:
    assert stack.healthy("coordinator", 1) and stack.healthy("worker", 3), stack.compose("ps", "--all").stdout
    assert [r["State"] for r in stack.containers("prometheus")] == ["running"]
    user = stack.run("docker", "image", "inspect", "--format", "{{.Config.User}}", PARLE_IMAGE).stdout.strip()
    assert user not in ("", "0", "root"), user
    for service in ("coordinator", "worker", "prometheus"):
        uid = stack.compose("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid != "0", f"{service} runs as root"
        stack.note(f"{service} runs as uid {uid}")
    from protos.messages import CoordinatorError

    with stack.client(token=None) as client, pytest.raises(CoordinatorError) as refused:
        client.jobs()
    assert refused.value.code == "UNAUTHENTICATED"
    with stack.client() as client:
        client.jobs()


def test_prometheus_scrapes_the_coordinator_and_three_workers_through_compose_dns(stack: Stack) -> None:
    def all_up() -> dict[str, list[str]]:
        up = stack.targets_up()
        return up if len(up.get("parle-coordinator", [])) == 1 and len(up.get("parle-worker", [])) == 3 else {}

    up = wait_for(all_up, 120, "Prometheus to scrape the coordinator and 3 workers", every=2)
    stack.note(f"targets up: {up}")
    assert up["parle-coordinator"] == ["coordinator:9100"]


def test_example_job_survives_a_killed_worker_and_a_killed_coordinator(stack: Stack) -> None:
    t0 = time.monotonic()
    done = stack.compose("run", "--rm", "-T", "--pull", "never", "submit", "submit", *JOB, "--coordinator",
                         "coordinator:50051", timeout=180)  # fmt: skip
    stack.job_id = done.stdout.strip().splitlines()[-1]
    stack.note(f"submitted {stack.job_id}: {' '.join(JOB)}")

    def at_round(n: int) -> dict[str, Any] | None:
        info = stack.job()
        assert info["state"] not in TERMINAL, f"the job ended before round {n}: {info}"
        return info if info["round"] >= n else None

    def kill_and_start(container: str, at: int, service: str) -> None:
        info = wait_for(lambda: at_round(at), 300, f"round {at}")
        stack.run("docker", "kill", container)
        stack.note(f"docker kill {container} at round {info['round']} ({time.monotonic() - t0:.0f}s)")
        time.sleep(3)
        assert stack.run("docker", "inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "false"
        stack.run("docker", "start", container)
        wait_for(lambda: stack.healthy(service, 1 if service == "coordinator" else 3), 120, f"{container} healthy", 2)
        stack.note(f"{container} started again and healthy ({time.monotonic() - t0:.0f}s)")

    kill_and_start(f"{PROJECT}-worker-1", KILL_WORKER_AT, "worker")
    kill_and_start(f"{PROJECT}-coordinator-1", KILL_COORDINATOR_AT, "coordinator")
    # The pool workers lived on: the job resumed at the round it was in, from the replicas they offered,
    # not from its last checkpoint.
    resumed = wait_for(lambda: [e for e in stack.job_events() if e["kind"] == "resume"], 120, "the resume event", 2)
    offers = [e for e in stack.job_events() if e["kind"] == "member" and e.get("start") == "offer"]
    stack.note(f"resumed at round {resumed[-1]['round']} from {resumed[-1]['from']}; {len(offers)} replicas offered")
    assert resumed[-1]["from"] == "round-state" and resumed[-1]["round"] >= KILL_COORDINATOR_AT, resumed

    info = wait_for(lambda: (i := stack.job())["state"] in TERMINAL and i, 600, "the job to end", every=2)
    error = f"{100 * info['test_error']:.2f}%" if "test_error" in info else "-"
    stack.note(
        f"job {info['id']}: {info['state']} at round {info['round']}, epoch {info['epoch']}, test error {error},"
        f" {time.monotonic() - t0:.0f}s from submit"
    )
    assert info["state"] == "succeeded", info
    assert info["round"] == ROUNDS


def test_prometheus_has_the_jobs_rounds_and_evaluates_the_rules_and_dashboard(stack: Stack) -> None:
    if stack.job_id is None:
        pytest.fail("no job was submitted (see the job test)")
    job = stack.job_id
    rounds = wait_for(lambda: stack.query(f'parle_rounds_total{{job_id="{job}", job="parle-coordinator"}} > 0'), 60,
                      "parle_rounds_total for the job", every=2)  # fmt: skip
    stack.note(f"Prometheus: parle_rounds_total{{job_id={job!r}}} = {rounds[0]['value'][1]} (since the restart)")
    workers = wait_for(lambda: stack.query(f'parle_worker_rounds_total{{job_id="{job}", job="parle-worker"}} > 0'), 60,
                       "parle_worker_rounds_total for the job", every=2)  # fmt: skip
    stack.note(f"Prometheus: parle_worker_rounds_total for the job from {len(workers)} worker series")
    assert len(stack.query('up{service=~"coordinator|worker"} == 1')) == 4
    groups = stack.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"parle.recording", "parle.alerts"}
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    exprs = dashboard_queries()
    assert len(exprs) > 10
    for expr in exprs:  # every dashboard query is one this Prometheus accepts
        stack.query(expr.replace("$__rate_interval", "1m").replace("$job_id", job))
    stack.note(f"rules healthy ({sum(len(g['rules']) for g in groups)}), {len(exprs)} dashboard queries accepted")


def test_scaled_to_five_workers_prometheus_scrapes_five(stack: Stack) -> None:
    up = ["up", "-d", "--no-build", "--pull", "never", "--no-recreate", "--wait", "--wait-timeout", "180"]
    stack.compose(*up, "--scale", "worker=5", "worker", timeout=240)
    assert stack.healthy("worker", 5)
    workers = wait_for(lambda: len(w := stack.targets_up().get("parle-worker", [])) == 5 and w, 120,
                       "Prometheus to scrape 5 workers", every=2)  # fmt: skip
    stack.note(f"--scale worker=5: Prometheus scrapes {workers}")


def test_the_state_volume_keeps_the_job_across_a_coordinator_restart(stack: Stack) -> None:
    if stack.job_id is None:
        pytest.fail("no job was submitted (see the job test)")
    before = stack.job()
    stack.compose("restart", "coordinator", timeout=120)
    wait_for(lambda: stack.healthy("coordinator", 1), 120, "the restarted coordinator to be healthy", every=2)
    after = wait_for(stack.job, 60, "the restarted coordinator to answer", every=2)
    assert (after["state"], after["round"]) == (before["state"], before["round"]) == ("succeeded", ROUNDS), after
    stack.note(f"after docker compose restart coordinator: {after['id']} {after['state']} at round {after['round']}")
