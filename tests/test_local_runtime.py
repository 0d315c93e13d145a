"""End to end through ``parle train``: the local runtime on synthetic data, resume after kill -9,
bad input, a NaN loss, and the sgd preset against torch.optim.SGD."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from cluster.cli import main
from cluster.local import run_local
from coordinator.events import read_events
from protos.spec import resolve
from worker.flat import FlatParameters
from worker.replica_rng import replica_seed
from worker.workloads import BatchSampler, build_model, load_dataset, shard_indices

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _config(tmp_path: Path, **overrides: object) -> Path:
    raw: dict[str, object] = {
        "name": "t",
        "preset": "parle",
        "replicas": 3,
        "epochs": 1,
        "model": {"name": "toy_models:slow_mlp", "options": {"delay": 0.0}},
        "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 32},
        "optim": {"L": 2, "noise": 1e-3},
        "eval": {"every_epochs": 0.5, "train_subset": 256},
        "checkpoint": {"every_rounds": 2},
    }
    raw.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(120)
def test_train_writes_a_complete_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--run-dir", str(run), "-q"]) == 0
    assert "test error" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "reference.safetensors", "final.safetensors", "curves.png"):
        assert (run / name).is_file(), name
    events = read_events(run / "metrics.jsonl")
    rounds = [e for e in events if e["kind"] == "round"]
    assert [e["round"] for e in rounds] == list(range(8))  # 16 batches per epoch / L = 2
    gammas = [e["gamma"] for e in rounds]
    assert gammas == sorted(gammas) and gammas[-1] > gammas[0]  # scoping, once per round
    tests = [e for e in events if e["kind"] == "eval" and e["split"] == "test"]
    assert [e["round"] for e in tests] == [3, 7] and tests[-1]["error"] < 0.5  # learns well below chance
    assert len(list((run / "checkpoints").iterdir())) == 3  # keep: 3
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["gamma_max"] == 1.0  # resolved preset
    # the exported model state dict carries BN statistics re-estimated for the reference
    final = load_file(str(run / "final.safetensors"))
    assert any(k.endswith("running_mean") for k in final)
    # parle eval and parle plot on the result
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test"]["error"] == pytest.approx(tests[-1]["error"], abs=1e-6)
    assert main(["plot", str(run), str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_same_seed_same_weights_different_seed_different(tmp_path: Path) -> None:
    spec = resolve(yaml.safe_load(_config(tmp_path, epochs=0.5).read_text()))
    refs = []
    for i, s in enumerate((spec, spec, spec.model_copy(update={"seed": 1}))):
        assert run_local(s, tmp_path / f"r{i}").state.value == "succeeded"
        refs.append(load_file(str(tmp_path / f"r{i}" / "reference.safetensors"))["reference"])
    assert torch.equal(refs[0], refs[1])
    assert not torch.equal(refs[0], refs[2])


@pytest.mark.timeout(180)
def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """kill -9 a real `parle train` after a few checkpoints, resume it, and compare bit for bit with an
    uninterrupted run (noise on: the RNG streams are part of the checkpoint)."""
    config = _config(tmp_path, model={"name": "toy_models:slow_mlp", "options": {"delay": 0.03}})
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "cluster.cli", "train"]
    proc = subprocess.Popen([*cmd, str(config), "--run-dir", str(run), "-q"], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoints" / "ckpt-000000004").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (run / "reference.safetensors").exists()
    resumed = subprocess.run([*cmd, "--resume", str(run), "-q"], env=env, cwd=REPO, timeout=120)
    assert resumed.returncode == 0

    straight = resolve(yaml.safe_load(config.read_text()))
    straight = straight.model_copy(update={"model": straight.model.model_copy(update={"options": {"delay": 0.0}})})
    assert run_local(straight, tmp_path / "straight").state.value == "succeeded"
    a = load_file(str(run / "reference.safetensors"))["reference"]
    b = load_file(str(tmp_path / "straight" / "reference.safetensors"))["reference"]
    assert torch.equal(a, b)
    rounds = [e["round"] for e in read_events(run / "metrics.jsonl") if e["kind"] == "round"]
    assert rounds == list(range(8))  # the log reads like one run


@pytest.mark.timeout(120)
def test_sgd_preset_equals_torch_sgd_step_for_step(tmp_path: Path) -> None:
    """The sgd preset through the whole local runtime vs torch.optim.SGD(nesterov) on the same batches,
    the same initialisation and the same dropout masks."""
    raw = {
        "preset": "sgd",
        "max_rounds": 50,
        "epochs": 10,
        "model": {"name": "toy_models:mlp", "options": {"dropout": 0.2}},
        "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 32},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "eval": {"every_epochs": 100},
        "checkpoint": {"every_rounds": 50},
    }
    spec = resolve(raw)
    assert run_local(spec, tmp_path / "run").state.value == "succeeded"
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    ours = load_file(str(ckpt / "tensors.safetensors"))["replica0.x"]  # after 50 steps

    data = load_dataset(spec.data, seed=spec.seed)
    torch.manual_seed(replica_seed(spec.seed, 0, 0))
    model = build_model(spec.model, data.input_shape, data.num_classes)
    shard = shard_indices(len(data.train_x), 0, 1, 1.0, spec.seed)
    sampler = BatchSampler(shard, data.train_x, data.train_y, 32, spec.seed, 0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(replica_seed(spec.seed, 0, 2))  # the replica's dropout stream
    for _ in range(50):
        xb, yb = sampler.next_batch()
        sgd.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        sgd.step()
    theirs = FlatParameters(model.parameters()).data
    assert float((ours - theirs).abs().max()) < 1e-6


BAD_INPUTS = [
    ({"optim": {"Lx": 3}}, "optim.Lx: unknown key"),
    ({"optim": {"L": "many"}}, "optim.L"),
    ({"optim": {"L": -1}}, "optim.L"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"optim": {"gamma0": 0.5, "gamma_max": 0.1}}, "gamma_max"),
    ({"data": {"name": "synthetic", "frac": 1.5}}, "data.frac"),
    ({"data": {"name": "synthetic", "frac": 0}}, "data.frac"),
    ({"replicas": 0}, "replicas"),
    ({"data": {"name": "mnist", "root": "/nonexistent/mnist"}}, "/nonexistent/mnist"),
    ({"data": {"name": "mnist", "root": "EMPTY"}}, "train-images-idx3-ubyte"),
    ({"model": {"name": "no_such_pkg.models:net"}}, "model.name"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("override", "needle"), BAD_INPUTS)
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: dict[str, object], needle: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    raw = yaml.safe_load(_config(tmp_path).read_text())
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            value = {**raw[key], **{k: str(empty) if v == "EMPTY" else v for k, v in value.items()}}
        raw[key] = value
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not run.exists()


@pytest.mark.timeout(60)
def test_set_override_and_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert main(["train", str(config), "--set", "optim.L=-3", "--run-dir", str(tmp_path / "r")]) == 2
    assert "optim.L" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(120)
def test_nan_loss_stops_the_job_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, model={"name": "toy_models:nan_after", "options": {"after": 9}}, replicas=1)
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "-q"]) == 1
    err = capsys.readouterr().err
    assert "training loss is nan" in err and "last good checkpoint" in err
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["ckpt-000000002", "ckpt-000000004"]  # 9 good steps = 4 rounds of L=2
    assert not (run / "reference.safetensors").exists()
    state = [e for e in read_events(run / "metrics.jsonl") if e["kind"] == "state"][-1]
    assert state["state"] == "failed"


@pytest.mark.timeout(120)
def test_train_warns_when_a_schedule_point_lies_beyond_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """entropy-sgd drops lr after 40 data passes (2 of the authors' epochs); a 1-pass budget never gets there."""
    config = _config(tmp_path, preset="entropy-sgd", replicas=1, optim={"L": 2}, max_rounds=2)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: optim.lr_drop_epochs: 40 lies beyond the budget of 1 data passes" in err
