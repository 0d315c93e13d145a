"""The shared transport test suite: every worker transport (in-process, gRPC, Ray) must pass it.

A transport module provides a ``Harness``: ``open_job(spec) -> Job`` (the coordinator side, for
inspection) and ``transport(job) -> WorkerTransport``. ``tests/test_transports.py`` runs these
checks once per harness.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import pytest
import torch
from torch import Tensor

from coordinator.job import Job
from coordinator.schedules import Schedule
from protos.messages import CoordinatorError, ExchangeReply, RoundStats
from protos.spec import JobSpec, resolve
from worker.transports import WorkerTransport

STATS = RoundStats(train_loss=1.0, inner_steps=2, samples=64, chain_seconds=0.01, train_size=256)
SIZE = 1000


class Harness(Protocol):
    def open_job(self, spec: JobSpec) -> Job: ...

    def transport(self, job: Job) -> WorkerTransport: ...


def small_spec(**overrides: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "suite",
        "preset": "parle",
        "replicas": 2,
        "epochs": 1,
        "model": {"name": "lenet"},
        "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
        "optim": {"L": 2, "round_deadline_s": 30},
        "checkpoint": {"every_rounds": 1},
        "runtime": {"lease_s": 30},
    }
    raw.update(overrides)
    return resolve(raw)


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run blocking calls concurrently (a sync round needs every member); re-raise the first error."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _two_members(h: Harness, **overrides: Any) -> tuple[Job, WorkerTransport, WorkerTransport]:
    job = h.open_job(small_spec(**overrides))
    a, b = h.transport(job), h.transport(job)
    grants = [a.join("a", "cpu", 0), b.join("b", "cpu", 1)]
    assert sorted(g.replica for g in grants) == [0, 1]
    assert all(g.values.round == 0 and g.start is None for g in grants)
    assert grants[0].spec == job.spec
    return job, a, b


def _round(a: WorkerTransport, b: WorkerTransport, k: int, mu_a: Tensor, mu_b: Tensor) -> list[ExchangeReply]:
    return in_threads(lambda: a.exchange(k, mu_a, STATS), lambda: b.exchange(k, mu_b, STATS))


def check_sync_round_returns_the_mean(h: Harness) -> None:
    job, a, b = _two_members(h)
    mu_a, mu_b = torch.randn(SIZE), torch.randn(SIZE)
    ra, rb = _round(a, b, 0, mu_a, mu_b)
    assert torch.allclose(ra.reference, (mu_a + mu_b) / 2, atol=1e-6)
    assert torch.equal(ra.reference, rb.reference)
    assert ra.closed_round == 0 and ra.next_values.round == 1
    assert ra.next_values.gamma == pytest.approx(Schedule(job.spec, STATS.train_size).gamma(1))
    assert ra.directives.checkpoint  # every_rounds: 1


def _state(value: float) -> dict[str, Tensor]:
    return {
        "x": torch.full((SIZE,), value),
        "outer_buf": torch.zeros(SIZE),
        "outer_steps": torch.tensor([1]),
        "sampler": torch.tensor([0, 3]),
        "rng_noise": torch.zeros(16, dtype=torch.uint8),
        "rng_global": torch.zeros(16, dtype=torch.uint8),
    }


def _refused(call: Callable[[], object], code: str, *words: str) -> None:
    with pytest.raises(CoordinatorError) as info:
        call()
    assert info.value.code == code and all(w in str(info.value) for w in words), (code, words, str(info.value))


def check_replica_states_are_checked_against_the_model(h: Harness) -> None:
    """Keys, shapes and dtypes: a state that does not fit the model is refused by name and changes nothing."""
    job, a, b = _two_members(h)
    _round(a, b, 0, torch.zeros(SIZE), torch.ones(SIZE))
    good = _state(1.0)
    bad = [
        ({**good, "bogus": torch.zeros(1)}, ("bogus",)),
        ({k: v for k, v in good.items() if k != "outer_buf"}, ("outer_buf", "missing")),
        ({**good, "x": torch.full((SIZE,), 1.0, dtype=torch.float64)}, ("x", "float64")),
        ({**good, "outer_buf": torch.zeros(SIZE + 1)}, ("outer_buf", f"[{SIZE + 1}]")),
        ({**good, "sampler": torch.tensor([0.0, 3.0])}, ("sampler", "int64")),
        ({**good, "rng_noise": torch.zeros(4, 4, dtype=torch.uint8)}, ("rng_noise",)),
    ]
    for state, words in bad:
        _refused(lambda state=state: a.report_state(0, state), "INVALID_ARGUMENT", *words)  # type: ignore[misc]
    assert job.store.latest() is None and job.model is None  # nothing was taken
    for t, value in ((a, 1.0), (b, 2.0)):
        t.report_state(0, _state(value))
    assert torch.equal(job.model, torch.full((SIZE,), 1.5))  # type: ignore[arg-type]


def check_rejoin_with_own_state(h: Harness) -> None:
    """A worker that lost its place asks for its replica back at its round: taken back with its own state,
    which it offers (checked like any replica state); at another round it joins like anyone else."""
    job, a, b = _two_members(h)
    _round(a, b, 0, torch.zeros(SIZE), torch.ones(SIZE))
    a.leave()  # a lost its place before uploading: round 0's model is b's x alone
    b.report_state(0, _state(2.0))
    assert torch.equal(job.model, torch.full((SIZE,), 2.0))  # type: ignore[arg-type]
    grant = a.join("a", "cpu", 0, resume_round=1)
    assert grant.resume and grant.replica == 0 and grant.values.round == 1 and grant.start is None
    assert not grant.resume_duties.evaluate and not grant.resume_duties.stop
    _refused(lambda: a.offer_state(2, _state(1.0)), "FAILED_PRECONDITION", "round 2")
    _refused(lambda: a.offer_state(1, {"x": torch.zeros(SIZE)}), "INVALID_ARGUMENT", "missing")
    a.offer_state(1, _state(1.0))
    _refused(lambda: a.offer_state(1, _state(1.0)), "FAILED_PRECONDITION")  # once
    replies = _round(a, b, 1, torch.zeros(SIZE), torch.ones(SIZE))
    assert all(r.closed_round == 1 for r in replies)
    a.leave()
    late = a.join("a", "cpu", 0, resume_round=7)  # not the job's round: an ordinary join
    assert not late.resume and late.start is not None


def check_checkpoint_collects_replica_states(h: Harness) -> None:
    """The model is the mean of the replicas' x after their step, not the center (the mean of mu)."""
    job, a, b = _two_members(h)
    replies = _round(a, b, 0, torch.zeros(SIZE), torch.ones(SIZE))
    assert all(r.directives.checkpoint and r.directives.model for r in replies)
    fetched: list[Tensor] = []
    waiter = threading.Thread(target=lambda: fetched.append(a.fetch_model(0)))
    waiter.start()  # the evaluator waits until every replica has uploaded its x
    for t, value in ((a, 1.0), (b, 2.0)):
        t.report_state(0, _state(value))
    waiter.join(timeout=30)
    assert fetched and torch.equal(fetched[0], torch.full((SIZE,), 1.5))
    job.flush()  # checkpoints are written by the job's disk writer, off its lock
    ckpt = job.store.latest()
    assert ckpt is not None and ckpt.round == 1
    assert torch.equal(ckpt.tensors["reference"], torch.full((SIZE,), 1.5))  # the model
    assert torch.equal(ckpt.tensors["center"], torch.full((SIZE,), 0.5))
    assert {k for k in ckpt.tensors if k.startswith("replica")} >= {"replica0.x", "replica1.x"}
    with pytest.raises(CoordinatorError) as info:  # a second upload for the same round
        a.report_state(0, _state(1.0))
    assert info.value.code == "FAILED_PRECONDITION"


def check_rejects_bad_updates_without_touching_the_reference(h: Harness) -> None:
    job, a, b = _two_members(h)
    _round(a, b, 0, torch.zeros(SIZE), torch.ones(SIZE))
    before, round_before = job.center.clone(), job.round  # type: ignore[union-attr]
    cases = [
        (lambda: a.exchange(0, torch.zeros(SIZE), STATS), "FAILED_PRECONDITION"),  # stale round
        (lambda: a.exchange(7, torch.zeros(SIZE), STATS), "FAILED_PRECONDITION"),  # future round
        (lambda: a.exchange(1, torch.zeros(SIZE + 1), STATS), "INVALID_ARGUMENT"),  # wrong shape
        (lambda: a.exchange(1, torch.full((SIZE,), float("nan")), STATS), "INVALID_ARGUMENT"),
        (lambda: a.exchange(1, torch.full((SIZE,), float("inf")), STATS), "INVALID_ARGUMENT"),
    ]
    for call, code in cases:
        with pytest.raises(CoordinatorError) as info:
            call()
        assert info.value.code == code, str(info.value)
    assert torch.equal(job.center, before) and job.round == round_before  # type: ignore[arg-type]


def check_leaving_member_does_not_block_the_round(h: Harness) -> None:
    job, a, b = _two_members(h)
    result: list[ExchangeReply] = []
    waiter = threading.Thread(target=lambda: result.append(a.exchange(0, torch.ones(SIZE), STATS)))
    waiter.start()
    b.leave()
    waiter.join(timeout=30)
    assert result and torch.equal(result[0].reference, torch.ones(SIZE))  # closed on the live member
    assert job.live_workers == 1


def check_late_joiner_starts_from_the_center_before_any_model(h: Harness) -> None:
    job, a, b = _two_members(h)
    _round(a, b, 0, torch.zeros(SIZE), torch.full((SIZE,), 4.0))
    b.leave()
    c = h.transport(job)
    grant = c.join("c", "cpu", None)
    assert grant.replica == 1 and grant.values.round == 1
    assert grant.start is not None and torch.equal(grant.start, torch.full((SIZE,), 2.0))


def check_full_job_and_stopped_job(h: Harness) -> None:
    job, a, _b = _two_members(h)
    with pytest.raises(CoordinatorError) as info:
        h.transport(job).join("extra", "cpu", None)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert a.heartbeat() is True
    job.cancel()
    with pytest.raises(CoordinatorError) as info:
        a.exchange(0, torch.zeros(SIZE), STATS)
    assert info.value.code == "FAILED_PRECONDITION"


CHECKS = [
    check_sync_round_returns_the_mean,
    check_checkpoint_collects_replica_states,
    check_replica_states_are_checked_against_the_model,
    check_rejoin_with_own_state,
    check_rejects_bad_updates_without_touching_the_reference,
    check_leaving_member_does_not_block_the_round,
    check_late_joiner_starts_from_the_center_before_any_model,
    check_full_job_and_stopped_job,
]
