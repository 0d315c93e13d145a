"""The round state a job saves every sync round, and a job restored from it (in process, no processes):
what the round just closed still owed is gathered from the workers taken back, a worker that lost the
round's reply runs it again and gets the saved center, a lost round line is logged again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transport_suite import SIZE, STATS, _state, in_threads, small_spec

from coordinator.checkpoint import CheckpointStore
from coordinator.events import read_events
from coordinator.job import Job
from coordinator.round_state import FILE, RoundState, load_round_state, save_round_state
from protos.messages import CoordinatorError, EvalReport
from protos.spec import JobSpec
from worker.transports.inprocess import InProcessTransport

# 2 replicas, 8 rounds; the model is gathered after rounds 1, 3, 5, 7 (evals), checkpoints after 3 and 7.
SPEC: dict[str, Any] = {"epochs": 2, "eval": {"every_epochs": 0.5}, "checkpoint": {"every_rounds": 4}}


def test_round_state_round_trips_and_a_torn_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / FILE
    state = RoundState(5, torch.arange(4.0), torch.ones(4), 3, 12.5, 256, {"kind": "round", "round": 4})
    save_round_state(path, state)
    back = load_round_state(path)
    assert back is not None and (back.round, back.model_round, back.elapsed, back.train_size) == (5, 3, 12.5, 256)
    assert torch.equal(back.center, state.center) and torch.equal(back.model, state.model)
    assert back.round_event == {"kind": "round", "round": 4}
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:40])  # what a non-atomic writer could leave
    assert load_round_state(path) is None  # then the job resumes from its checkpoint


def test_saves_reuse_the_previous_files_and_a_crash_at_any_step_leaves_a_whole_state(tmp_path: Path) -> None:
    path = tmp_path / FILE
    spare, old = tmp_path / f".{FILE}.spare", tmp_path / f".{FILE}.old"
    # 1.3M float32: 5.2 MB, written in three pieces (round_state._WRITE_BYTES); then smaller files over it
    for k, (n, dtype) in enumerate([(1_300_000, torch.float32), (10, torch.float32), (700, torch.bfloat16)] * 2):
        center = torch.arange(float(n)).to(dtype) + k
        model = torch.full((n,), float(k), dtype=dtype)
        save_round_state(path, RoundState(k, center, model, k - 1, float(k), 64, {"round": k}))
        back = load_round_state(path)
        assert back is not None and back.round == k and back.round_event == {"round": k}
        assert back.center.dtype == dtype and torch.equal(back.center, center) and torch.equal(back.model, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FILE, spare.name])  # one spare, no leftovers
    spare.write_bytes(b"torn: the spare was being rewritten when the coordinator died")
    assert load_round_state(path) is not None and load_round_state(path).round == 5  # type: ignore[union-attr]
    os.link(path, old)  # died between naming the current state twice and the rename
    save_round_state(path, RoundState(6, torch.ones(3), torch.ones(3), 5, 6.0, 64, None))
    assert load_round_state(path).round == 6  # type: ignore[union-attr]
    assert not old.exists()


def test_a_model_that_is_still_the_center_is_written_once_and_read_back_as_its_own_tensor(tmp_path: Path) -> None:
    path, center = tmp_path / FILE, torch.arange(1000.0)
    save_round_state(path, RoundState(2, center, center, -1, 1.0, 8, None))
    assert path.stat().st_size < 2 * center.numel() * 4  # one copy of the bytes, not two
    back = load_round_state(path)
    assert back is not None and torch.equal(back.center, center) and torch.equal(back.model, center)
    assert back.model.data_ptr() != back.center.data_ptr()  # as before: restored separately


def run_round(job: Job, a: InProcessTransport, b: InProcessTransport, k: int, uploads: bool = True) -> None:
    replies = in_threads(
        lambda: a.exchange(k, torch.full((SIZE,), float(k)), STATS), lambda: b.exchange(k, torch.ones(SIZE), STATS)
    )
    if not uploads:
        return
    for t, reply, value in ((a, replies[0], 1.0), (b, replies[1], 2.0)):
        if reply.directives.model:
            t.report_state(k, _state(value + k))
    for t, reply in ((a, replies[0]), (b, replies[1])):
        if reply.directives.evaluate:
            t.fetch_model(k)
            t.report_eval(EvalReport(k, 0.0, {"test": (1.0, 0.5)}))


JobAndTransports = tuple[Job, InProcessTransport, InProcessTransport]


def started(spec: JobSpec, job_dir: Path, persist_rounds: bool = True) -> JobAndTransports:
    """A job with its two replicas joined (a: replica 0, b: replica 1)."""
    job = Job("j", spec, job_dir, persist_rounds=persist_rounds)
    a, b = InProcessTransport(job, timeout_s=30), InProcessTransport(job, timeout_s=30)
    a.join("a", "cpu", 0), b.join("b", "cpu", 1)
    return job, a, b


def restored(spec: JobSpec, job_dir: Path) -> Job:
    """The job as a restarted coordinator takes it up: its last checkpoint and its round state."""
    return Job(
        "j",
        spec,
        job_dir,
        resume=CheckpointStore(job_dir / "checkpoints").latest(),
        round_state=load_round_state(job_dir / FILE),
        persist_rounds=True,
    )


def rounds_logged(job_dir: Path) -> list[int]:
    return [e["round"] for e in read_events(job_dir / "metrics.jsonl") if e["kind"] == "round"]


@pytest.mark.timeout(60)
def test_restored_job_gathers_what_the_closed_round_owed_and_answers_a_rerun(tmp_path: Path) -> None:
    spec = small_spec(**SPEC)
    job_dir = tmp_path / "job"
    first, a, b = started(spec, job_dir)
    for k in range(3):
        run_round(first, a, b, k)
    run_round(first, a, b, 3, uploads=False)  # round 3 closed; the coordinator dies before its duties
    center = first.center.clone()  # type: ignore[union-attr]
    first.close()
    assert load_round_state(job_dir / FILE).round == 4  # type: ignore[union-attr]
    # The crash also came before round 3's line reached the log: the restored job logs it again.
    kept = [e for e in read_events(job_dir / "metrics.jsonl") if not (e["kind"] == "round" and e["round"] == 3)]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))

    job = restored(spec, job_dir)
    job.flush()  # events reach the log on the job's writer
    assert job.round == 4 and rounds_logged(job_dir) == [0, 1, 2, 3]
    a, b = InProcessTransport(job, timeout_s=30), InProcessTransport(job, timeout_s=30)
    # a got round 3's reply: it is at round 4 and owes round 3's evaluation (nobody reported it).
    grant = a.join("a", "cpu", 0, resume_round=4)
    assert grant.resume and grant.values.round == 4 and grant.resume_duties.evaluate
    assert not grant.resume_duties.stop and not grant.resume_duties.export
    a.offer_state(4, _state(1.0))  # its state after round 3's elastic step: round 3's model needs it
    # b lost round 3's reply: it is taken back at round 3, runs it again and gets the saved center.
    grant = b.join("b", "cpu", 1, resume_round=3)
    assert grant.resume and grant.values.round == 3 and not grant.resume_duties.evaluate
    with pytest.raises(CoordinatorError) as info:
        b.offer_state(3, {**_state(2.0), "x": torch.zeros(SIZE, dtype=torch.float64)})
    assert info.value.code == "INVALID_ARGUMENT" and "dtype" in str(info.value)
    b.offer_state(3, _state(2.0))
    reply = b.exchange(3, torch.ones(SIZE), STATS)
    assert reply.closed_round == 3 and torch.equal(reply.reference, center)
    assert reply.directives.model and reply.directives.checkpoint and not reply.directives.evaluate
    b.report_state(3, _state(2.0))  # round 3's model and checkpoint are complete
    assert torch.equal(a.fetch_model(3), torch.full((SIZE,), 1.5))
    a.report_eval(EvalReport(3, 1.0, {"test": (1.0, 0.5)}))
    job.flush()  # checkpoints are written by the job's disk writer, off its lock
    ckpt = CheckpointStore(job_dir / "checkpoints").latest()
    assert ckpt is not None and ckpt.round == 4 and torch.equal(ckpt.tensors["replica1.x"], torch.full((SIZE,), 2.0))
    for k in range(4, 8):
        run_round(job, a, b, k)
    assert job.wait(timeout=30).value == "succeeded"
    job.close()
    assert rounds_logged(job_dir) == list(range(8))
    evals = [e["round"] for e in read_events(job_dir / "metrics.jsonl") if e["kind"] == "eval"]
    assert evals == [1, 3, 5, 7]
    resumes = [e for e in read_events(job_dir / "metrics.jsonl") if e["kind"] == "resume"]
    assert [(e["round"], e["from"]) for e in resumes] == [(4, "round-state")]


@pytest.mark.timeout(60)
def test_replica_back_without_its_state_joins_from_the_checkpoint_and_owes_nothing(tmp_path: Path) -> None:
    spec = small_spec(**SPEC)
    job_dir = tmp_path / "job"
    first, a, b = started(spec, job_dir)
    for k in range(5):
        run_round(first, a, b, k)
    run_round(first, a, b, 5, uploads=False)  # round 5 (an eval round) closed, then the crash
    first.close()
    job = restored(spec, job_dir)
    a, b = InProcessTransport(job, timeout_s=30), InProcessTransport(job, timeout_s=30)
    assert a.join("a", "cpu", 0, resume_round=6).resume
    a.offer_state(6, _state(1.0))
    fresh = b.join("b", "cpu", 1)  # a new worker: replica 1 comes from checkpoint 4
    assert not fresh.resume and fresh.replica_state is not None and fresh.values.round == 6
    assert torch.equal(fresh.replica_state["x"], torch.full((SIZE,), 2.0 + 3))
    assert torch.equal(a.fetch_model(5), torch.full((SIZE,), 1.0))  # round 5's model: a's x alone


@pytest.mark.timeout(60)
def test_after_the_last_round_the_model_is_gathered_from_the_workers_that_come_back(tmp_path: Path) -> None:
    spec = small_spec(**SPEC, runtime={"lease_s": 30, "start_timeout_s": 0.2})
    job_dir = tmp_path / "job"
    first, a, b = started(spec, job_dir)
    for k in range(7):
        run_round(first, a, b, k)
    run_round(first, a, b, 7, uploads=False)  # the last round closed; b uploads, leaves and exits, then the crash
    first.close()
    job = Job("j", spec, job_dir, round_state=load_round_state(job_dir / FILE), persist_rounds=True)
    a = InProcessTransport(job, timeout_s=30)
    grant = a.join("a", "cpu", 0, resume_round=8)
    assert grant.resume and grant.resume_duties.evaluate and grant.resume_duties.export and grant.resume_duties.stop
    a.offer_state(8, _state(1.0))
    deadline = time.monotonic() + 30
    while job.model is None or not torch.equal(job.model, torch.full((SIZE,), 1.0)):
        assert time.monotonic() < deadline, "the gang never opened without b"
        time.sleep(0.05)
        job.open_gang_if_due()  # the coordinator's reaper does this every half second
    a.fetch_model(7)
    a.report_eval(EvalReport(7, 2.0, {"test": (1.0, 0.5)}, {"w": torch.zeros(2)}))
    assert job.wait(timeout=30).value == "succeeded" and (job_dir / "final.safetensors").is_file()
    job.close()


@pytest.mark.timeout(60)
def test_a_checkpoint_whose_replicas_all_left_before_uploading_is_written_from_the_center(tmp_path: Path) -> None:
    """No model gathered yet and nobody left to upload one: the checkpoint's model is the center (as a copy:
    safetensors refuses two names for one tensor, which once made the last Leave fail with INTERNAL)."""
    spec = small_spec(epochs=2, eval={"every_epochs": 1e12}, checkpoint={"every_rounds": 2})
    job, a, b = started(spec, tmp_path / "job", persist_rounds=False)
    run_round(job, a, b, 0)
    run_round(job, a, b, 1, uploads=False)  # round 1 asks for the model and a checkpoint ...
    a.leave()
    b.leave()  # ... and nobody uploads it
    job.flush()
    ckpt = job.store.latest()
    assert ckpt is not None and ckpt.round == 2
    assert torch.equal(ckpt.tensors["reference"], ckpt.tensors["center"])
    job.close()
