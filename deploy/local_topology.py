"""docker-compose.yml's topology as local processes on 127.0.0.1: ``python -m deploy.local_topology``.

The coordinator and every worker replica run the commands written in the compose file, with only the
container world mapped to this host: compose service names and 0.0.0.0 become 127.0.0.1, each
container port becomes a free local port (per replica), named volumes become folders under a work
directory, and env files and environments are read as compose reads them. Prometheus (the Debian
package's ``prometheus``) runs a config derived from ``deploy/prometheus.yml``: the same scrape settings,
labels, relabelling and rule files, with static loopback targets instead of service names and DNS
discovery. Then the ``submit`` service's command submits the example job, and we wait for it.

Every child runs in its own session and is reaped on exit (terminate, then kill).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
LOOPBACK = "127.0.0.1"
ANY_HOST = ("0.0.0.0", "localhost", "127.0.0.1")
TERMINAL = ("succeeded", "failed", "cancelled")
_HOST_PORT = re.compile(r"^([A-Za-z0-9_.-]+):(\d+)$")


class TopologyError(RuntimeError):
    """A process of the topology did not come up, or the compose file has something we cannot map."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads them (comments, blank lines and surrounding quotes ignored)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.removeprefix("export ").strip()] = value
    return env


def service_env(service: dict[str, Any], base_dir: Path) -> dict[str, str]:
    """The variables compose gives a service: its env files (a missing optional one is skipped), then
    ``environment`` (which wins)."""
    env: dict[str, str] = {}
    files = service.get("env_file") or []
    for entry in [files] if isinstance(files, str | dict) else files:
        path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        full = base_dir / path
        if full.is_file():
            env.update(read_env_file(full))
        elif required:
            raise TopologyError(f"env_file {full} is required by the compose file and does not exist")
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(i.split("=", 1) if "=" in i else (i, os.environ.get(i, "")) for i in environment)
    env.update({str(k): "" if v is None else str(v) for k, v in environment.items()})
    return env


@dataclass
class Instance:
    """One container of a service (a replica), as a local process."""

    service: str
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class LocalTopology:
    """Start with ``start()`` (or use as a context manager), then ``submit()`` and ``wait_job()``."""

    workdir: Path
    compose_file: Path = COMPOSE_FILE
    prometheus_config: Path = PROMETHEUS_CONFIG
    scrape_interval: str | None = None  # e.g. "1s" for tests; None keeps the config's
    extra_env: dict[str, str] = field(default_factory=dict)
    prometheus_bin: str = "prometheus"
    python: str = sys.executable
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    prometheus_port: int = 0

    def __post_init__(self) -> None:
        self.compose: dict[str, Any] = yaml.safe_load(self.compose_file.read_text())
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)

    # --- mapping the container world onto this host ---

    def replicas(self, service: str) -> list[str]:
        spec = self.services[service]
        n = int((spec.get("deploy") or {}).get("replicas", spec.get("scale", 1)))
        return [service] if n == 1 else [f"{service}-{i}" for i in range(1, n + 1)]

    def port(self, instance: str, container_port: int) -> int:
        """The local port standing for ``container_port`` of one container (allocated on first use)."""
        key = (instance, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def address(self, host: str, container_port: int, instance: str) -> list[str]:
        """``host:port`` as seen from ``instance``: itself for 0.0.0.0/localhost, else every replica of a service."""
        if host in ANY_HOST:
            return [f"{LOOPBACK}:{self.port(instance, container_port)}"]
        if host not in self.services:
            raise TopologyError(f"{host}:{container_port}: not a compose service")
        return [f"{LOOPBACK}:{self.port(replica, container_port)}" for replica in self.replicas(host)]

    def volume_dirs(self, service: str) -> dict[str, Path]:
        """Container path -> local path for the service's volumes."""
        out: dict[str, Path] = {}
        for volume in self.services[service].get("volumes") or []:
            source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
            if source.startswith((".", "/")):  # a bind mount: the host path itself
                out[target] = (self.compose_file.parent / source).resolve()
            else:  # a named volume: one folder, shared by the replicas as in compose
                out[target] = self.workdir / source
                out[target].mkdir(parents=True, exist_ok=True)
        return out

    def map_argv(self, service: str, instance: str, argv: Sequence[str]) -> list[str]:
        volumes = self.volume_dirs(service)
        out: list[str] = []
        for i, arg in enumerate(argv):
            flag = argv[i - 1] if i else ""
            match = _HOST_PORT.match(arg)
            if match:
                mapped = self.address(match[1], int(match[2]), instance)
                if len(mapped) != 1:
                    raise TopologyError(f"{service}: {arg} names a service with {len(mapped)} replicas")
                arg = mapped[0]
            elif arg in ANY_HOST:
                arg = LOOPBACK
            elif flag.startswith("--") and "port" in flag and arg.isdigit():
                arg = str(self.port(instance, int(arg)))
            else:
                for target, local in volumes.items():
                    if arg == target or arg.startswith(target.rstrip("/") + "/"):
                        arg = str(local) + arg[len(target) :]
            out.append(arg)
        return out

    def instance(self, service: str, name: str, argv_tail: Sequence[str] = ()) -> Instance:
        spec = self.services[service]
        command = spec.get("command")
        if not isinstance(command, list):
            raise TopologyError(f"service {service}: write its command as a list (compose's exec form)")
        # The image's ENTRYPOINT is ["parle"], i.e. cluster.cli:main.
        argv = [self.python, "-m", "cluster.cli", *self.map_argv(service, name, [*command, *argv_tail])]
        env = {**os.environ, **service_env(spec, self.compose_file.parent), **self.extra_env}
        return Instance(service, name, argv, env)

    # --- processes ---

    def spawn(self, inst: Instance) -> Instance:
        inst.log = self.workdir / "logs" / f"{inst.name}.log"
        with inst.log.open("ab") as log:
            inst.proc = subprocess.Popen(
                inst.argv, env=inst.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.instances.append(inst)
        return inst

    def wait_until(self, ok: Callable[[], bool], timeout: float, what: str, inst: Instance | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if inst is not None and inst.proc is not None and inst.proc.poll() is not None:
                raise TopologyError(f"{inst.name} exited ({inst.proc.returncode}) before {what}:\n{self.tail(inst)}")
            if time.monotonic() > deadline:
                raise TopologyError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    @staticmethod
    def tail(inst: Instance, lines: int = 30) -> str:
        if inst.log is None or not inst.log.exists():
            return ""
        return "\n".join(inst.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout: float = 120.0) -> LocalTopology:
        """Coordinator, then (once it answers gRPC, like ``condition: service_healthy``) the workers, then
        Prometheus; returns when every one answers."""
        coordinator = self.spawn(self.instance("coordinator", "coordinator"))
        self.wait_until(lambda: grpc_ready(self.coordinator_address), timeout, "the coordinator", coordinator)
        workers = [self.spawn(self.instance("worker", name)) for name in self.replicas("worker")]
        for w in workers:
            url = self.worker_metrics_url(w.name)
            self.wait_until(functools.partial(http_ok, url), timeout, f"{w.name} /metrics", w)
        self.start_prometheus(timeout)
        return self

    def start_prometheus(self, timeout: float) -> None:
        config = loopback_prometheus_config(
            yaml.safe_load(self.prometheus_config.read_text()), self.prometheus_config.parent, self.address,
            self.scrape_interval,
        )  # fmt: skip
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        binary = shutil.which(self.prometheus_bin)
        if binary is None:
            raise TopologyError(f"{self.prometheus_bin}: not found (Debian: apt-get install prometheus)")
        self.prometheus_port = free_port()
        argv = [binary, f"--config.file={path}", f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address={LOOPBACK}:{self.prometheus_port}"]  # fmt: skip
        inst = self.spawn(Instance("prometheus", "prometheus", argv, dict(os.environ)))
        self.wait_until(lambda: http_ok(f"{self.prometheus_url}/-/ready"), timeout, "Prometheus", inst)

    def close(self) -> None:
        """Terminate every child (newest first), wait, then kill what is left."""
        from cluster.processes import reap

        reap([i.proc for i in reversed(self.instances) if i.proc is not None], grace_s=10.0)

    def __enter__(self) -> LocalTopology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- where things are ---

    @property
    def coordinator_address(self) -> str:
        """Where clients reach the coordinator: the submit service's ``--coordinator``, mapped."""
        command = self.services["submit"]["command"]
        return self.map_argv("submit", "submit", [command[command.index("--coordinator") + 1]])[0]

    @property
    def coordinator_metrics_url(self) -> str:
        return self.metrics_url("coordinator", "coordinator")

    def worker_metrics_url(self, name: str) -> str:
        return self.metrics_url("worker", name)

    def metrics_url(self, service: str, instance: str) -> str:
        command = self.services[service]["command"]
        container_port = int(command[command.index("--metrics-port") + 1])
        return f"http://{LOOPBACK}:{self.port(instance, container_port)}/metrics"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    # --- the job ---

    def submit(self, config: str | Path | None = None, extra: Sequence[str] = (), timeout: float = 120.0) -> str:
        """Run the ``submit`` service's command (optionally with another config and extra flags such as
        ``--set max_rounds=4``); returns the job id it prints."""
        inst = self.instance("submit", "submit", extra)
        if config is not None:
            inst.argv[inst.argv.index("submit") + 1] = str(config)
        done = subprocess.run(inst.argv, env=inst.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise TopologyError(f"submit failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip().splitlines()[-1]

    def job_state(self, job_id: str) -> dict[str, Any]:
        from cluster.client import Endpoint, JobsClient, describe

        token = self.instance("submit", "submit").env.get("PARLE_TOKEN") or None
        with JobsClient(Endpoint(self.coordinator_address, token), timeout_s=10) as client:
            return describe(client.get(job_id))

    def wait_job(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll the job until it ends; fails early if a process of the topology died."""
        deadline = time.monotonic() + timeout
        while (info := self.job_state(job_id))["state"] not in TERMINAL:
            for inst in self.instances:
                if inst.proc is not None and inst.proc.poll() is not None:
                    raise TopologyError(f"{inst.name} exited ({inst.proc.returncode}):\n{self.tail(inst)}")
            if time.monotonic() > deadline:
                raise TopologyError(f"job {job_id} still {info['state']} after {timeout:.0f}s")
            time.sleep(0.5)
        return info

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through Prometheus's HTTP API; returns ``data.result``."""
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise TopologyError(f"query {promql!r}: {body}")
        return list(body["data"]["result"])


def loopback_prometheus_config(
    config: dict[str, Any],
    config_dir: Path,
    resolve: Callable[[str, int, str], list[str]],
    scrape_interval: str | None = None,
) -> dict[str, Any]:
    """``config`` with its targets on loopback: static targets and DNS names go through ``resolve(host, port,
    instance)``; every other setting stays, rule files become absolute. ``scrape_interval`` (tests) replaces
    the global scrape and evaluation intervals and any per-job ones."""
    out = json.loads(json.dumps(config))  # a deep copy of plain data
    out["rule_files"] = [str((config_dir / f).resolve()) for f in out.get("rule_files") or []]
    if scrape_interval:
        intervals = ("scrape_interval", "evaluation_interval", "scrape_timeout")
        out.setdefault("global", {}).update(dict.fromkeys(intervals, scrape_interval))
    for job in out.get("scrape_configs") or []:
        if scrape_interval:
            for key in ("scrape_interval", "scrape_timeout"):
                job.pop(key, None)
        statics = []
        for static in job.pop("static_configs", []):
            targets = [t for target in static["targets"] for t in _resolve_target(target, resolve)]
            statics.append({**static, "targets": targets})
        for dns in job.pop("dns_sd_configs", []):
            names = [n.removeprefix("tasks.") for n in dns["names"]]
            targets = [t for n in dict.fromkeys(names) for t in resolve(n, int(dns["port"]), n)]
            statics.append({"targets": targets})
        unknown = [key for key in job if key.endswith("_sd_configs")]
        if unknown:
            raise TopologyError(f"scrape job {job['job_name']}: cannot map {', '.join(unknown)} to loopback")
        job["static_configs"] = statics
    return out


def _resolve_target(target: str, resolve: Callable[[str, int, str], list[str]]) -> list[str]:
    match = _HOST_PORT.match(target)
    if not match:
        raise TopologyError(f"scrape target {target!r}: expected HOST:PORT")
    return resolve(match[1], int(match[2]), match[1])


def grpc_ready(address: str, timeout: float = 1.0) -> bool:
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local_topology", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="job to submit (default: the compose submit service's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to parle submit")
    parser.add_argument("--workdir", type=Path, help="state, logs and Prometheus data (default: a temporary folder)")
    parser.add_argument("--scrape-interval", help="override the scrape and rule evaluation interval, e.g. 1s")
    parser.add_argument("--keep", action="store_true", help="keep everything running after the job (Ctrl-C stops)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="parle-topology-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the children are reaped (they run in their own sessions).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with _workdir(args.workdir) as workdir, LocalTopology(workdir, scrape_interval=args.scrape_interval) as topo:
            return _run(topo, workdir, args)
    except TopologyError as err:
        print(f"local topology: {err}", file=sys.stderr)
        return 1


def _run(topo: LocalTopology, workdir: Path, args: argparse.Namespace) -> int:
    print(f"coordinator  {topo.coordinator_address} (gRPC), {topo.coordinator_metrics_url}")
    for name in topo.replicas("worker"):
        print(f"{name:<12} {topo.worker_metrics_url(name)}")
    print(f"prometheus   {topo.prometheus_url}")
    print(f"logs         {workdir / 'logs'}", flush=True)
    job_id = topo.submit(args.config, [item for kv in args.set for item in ("--set", kv)])
    print(f"submitted {job_id}: parle status {job_id} --watch --coordinator {topo.coordinator_address}", flush=True)
    info = topo.wait_job(job_id, args.timeout)
    print(json.dumps(info, indent=1))
    rounds = topo.query(f'sum(parle_rounds_total{{job_id="{job_id}"}})')
    print(f"Prometheus: parle_rounds_total {rounds[0]['value'][1] if rounds else '(not scraped yet)'}", flush=True)
    if args.keep:
        print("running; Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0 if info["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
