"""The KubeRay manifests and the Ray cluster launcher config: well-formed, matching the Ray we pin, and
running a job file that exists and validates."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from protos.spec import load_spec

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
pytestmark = pytest.mark.timeout(30)


def _load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / name).read_text()))


def _cluster_specs() -> list[dict[str, Any]]:
    cluster = _load("kuberay/raycluster.yaml")
    job = _load("kuberay/rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return [cluster["spec"], job["spec"]["rayClusterSpec"]]


def test_kuberay_clusters_pin_our_ray_and_mount_shared_storage() -> None:
    for spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert "/shared" in mounts and {v["name"] for v in pod["volumes"]} == {"shared"}


def test_rayjob_entrypoint_is_a_valid_parle_job() -> None:
    entrypoint = shlex.split(_load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert entrypoint[:2] == ["parle", "train"] and "--runtime" in entrypoint
    assert entrypoint[entrypoint.index("--runtime") + 1] == "ray"
    assert entrypoint[entrypoint.index("--run-dir") + 1].startswith("/shared/")
    overrides = [entrypoint[i + 1] for i, word in enumerate(entrypoint) if word == "--set"]
    spec = load_spec(DEPLOY.parent / entrypoint[2], overrides)
    assert spec.runtime.ray.num_cpus == 2


def test_cluster_launcher_config_starts_ray_on_every_node() -> None:
    config = _load("ray/cluster.yaml")
    assert config["provider"]["type"] == "local" and config["docker"]["image"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    assert config["min_workers"] == len(config["provider"]["worker_ips"])
    # the dashboard / job API runs any job: loopback only, reached through an SSH tunnel
    head = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head.split()
