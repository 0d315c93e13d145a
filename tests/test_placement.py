"""Replica placement over GPUs, tested without one: the placement rule, one turn group per device in the
local runtime (device count injected), the worker processes' --device flags, and the clear error when a
job asks for a GPU that is not there."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import cluster.local as local
from cluster.cli import main
from cluster.local import OrderedTurns, place_replicas, replica_device, run_local
from cluster.processes import worker_options
from protos.spec import SpecError, resolve


def test_cuda_spreads_replicas_over_the_visible_gpus() -> None:
    assert [replica_device("cuda", a, 3) for a in range(7)] == [f"cuda:{a % 3}" for a in range(7)]
    assert [replica_device("cuda", a, 1) for a in range(3)] == ["cuda:0"] * 3


def test_cpu_and_a_pinned_gpu_stay_where_they_are() -> None:
    assert [replica_device("cpu", a, 0) for a in range(3)] == ["cpu"] * 3
    assert [replica_device("cpu", a, 4) for a in range(3)] == ["cpu"] * 3
    assert [replica_device("cuda:1", a, 4) for a in range(3)] == ["cuda:1"] * 3


@pytest.mark.parametrize(("device", "count"), [("cuda", 0), ("cuda:0", 0), ("cuda:2", 2)])
def test_a_gpu_that_is_not_visible_is_a_spec_error_naming_device(device: str, count: int) -> None:
    with pytest.raises(SpecError, match=f"^device: {device},") as err:
        replica_device(device, 0, count)
    assert "\n" not in str(err.value)


def test_local_runtime_has_one_turn_group_per_device() -> None:
    placement = place_replicas("cuda", 5, 2)
    assert placement.devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert set(placement.turns) == {"cuda:0", "cuda:1"}
    assert placement.turns_of(0) is placement.turns_of(2) is placement.turns_of(4)
    assert placement.turns_of(1) is placement.turns_of(3)
    assert placement.turns_of(0) is not placement.turns_of(1)
    assert placement.exchange_turns is None  # sync: a round's mean does not depend on arrival order
    assert place_replicas("cuda", 5, 2, ordered_exchanges=True).exchange_turns is not None
    assert place_replicas("cuda", 5, 1, ordered_exchanges=True).exchange_turns is None  # one group: its turns
    for device, count in (("cpu", 0), ("cpu", 4), ("cuda:1", 2)):
        single = place_replicas(device, 3, count)
        assert len(single.turns) == 1 and single.turns_of(0) is single.turns_of(2)


def test_groups_take_turns_independently() -> None:
    """Replicas 0 and 2 share a device, 1 is alone on the other: 1 computes while 0 holds its turn, 2 waits."""
    placement = place_replicas("cuda", 3, 2)
    events: list[str] = []
    zero_in, release = threading.Event(), threading.Event()

    def replica(index: int) -> None:
        with placement.turns_of(index)(index):
            events.append(f"{index} in")
            if index == 0:
                zero_in.set()
                release.wait(5)
            events.append(f"{index} out")

    first = threading.Thread(target=replica, args=(0,))
    first.start()
    assert zero_in.wait(5)
    others = [threading.Thread(target=replica, args=(r,)) for r in (2, 1)]
    for thread in others:
        thread.start()
    others[1].join(5)  # replica 1 needs nothing from replica 0
    assert events == ["0 in", "1 in", "1 out"]
    release.set()
    for thread in (first, *others):
        thread.join(5)
    assert events[3:] == ["0 out", "2 in", "2 out"]


def test_ordered_turns_over_a_subset_go_in_replica_order() -> None:
    turns = OrderedTurns([4, 1, 7])
    order: list[int] = []

    def replica(index: int) -> None:
        for _ in range(2):
            with turns(index):
                order.append(index)
        turns.retire(index)

    threads = [threading.Thread(target=replica, args=(r,)) for r in (7, 4, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert order == [1, 4, 7, 1, 4, 7]


def test_run_local_places_each_replica_with_its_device_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: dict[int, dict[str, Any]] = {}

    class Recorder:
        def __init__(self, transport: object, name: str, device: str, replica: int, turns: object, **kw: Any) -> None:
            made[replica] = {"device": device, "turns": turns, **kw}

        def run(self) -> None:
            pass

    monkeypatch.setattr(local, "WorkerLoop", Recorder)
    spec = resolve({"replicas": 3, "device": "cuda", "data": {"name": "synthetic", "synthetic_size": 256}})
    run_local(spec, tmp_path / "run", device_count=2)
    assert [made[r]["device"] for r in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert made[0]["turns"] is made[2]["turns"] and made[0]["turns"] is not made[1]["turns"]

    made.clear()
    easgd = resolve({"preset": "easgd", "replicas": 3, "device": "cuda", "data": {"name": "synthetic"}})
    run_local(easgd, tmp_path / "async", device_count=2)
    assert made[0]["exchange_turns"] is made[1]["exchange_turns"] is made[2]["exchange_turns"]
    assert isinstance(made[0]["exchange_turns"], OrderedTurns)


def test_worker_processes_get_their_replicas_device() -> None:
    spec = resolve({"replicas": 3, "device": "cuda"})
    flags = worker_options(spec, 3, device_count=2, threads=1)
    assert [f[f.index("--device") + 1] for f in flags] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [f[f.index("--replica") + 1] for f in flags] == ["0", "1", "2"]
    pinned = worker_options(spec.model_copy(update={"device": "cuda:1"}), 3, device_count=2, threads=1)
    assert {f[f.index("--device") + 1] for f in pinned} == {"cuda:1"}
    cpu = worker_options(spec.model_copy(update={"device": "cpu"}), 2, device_count=0, threads=1)
    assert {f[f.index("--device") + 1] for f in cpu} == {"cpu"}


def test_train_on_cuda_without_a_gpu_is_bad_input_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "data": {"name": "synthetic", "synthetic_size": 256}}))
    for extra in ([], ["--workers", "2"]):
        run = tmp_path / f"run{len(extra)}"
        assert main(["train", str(config), "--set", "device=cuda", "--run-dir", str(run), "-q", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("parle: device: cuda, but no CUDA GPU is visible") and "\n" not in err
        assert not run.exists()
    assert main(["worker", "--coordinator", "127.0.0.1:1", "--device", "cuda", "--replica", "1"]) == 2
    assert "device: cuda" in capsys.readouterr().err
