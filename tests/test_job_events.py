"""The event records a job writes to metrics.jsonl (and streams to Watch, Prometheus, progress bars): the
typed events turn into the stable record format, field for field."""

from __future__ import annotations

import json

from coordinator.job_events import (
    CheckpointFailed,
    CheckpointWritten,
    Evaluated,
    MemberChanged,
    Resumed,
    RoundClosed,
    StateChanged,
)


def test_records_name_their_kind_first_and_keep_their_fields() -> None:
    round_closed = RoundClosed(3, 0.5, 0.01, 1.0, 0.1, 2.3, 0.02, 3, 1.5, 1.2)
    assert round_closed.as_record() == {
        "kind": "round",
        "round": 3,
        "epoch": 0.5,
        "gamma": 0.01,
        "rho": 1.0,
        "lr": 0.1,
        "train_loss": 2.3,
        "consensus_distance": 0.02,
        "workers": 3,
        "round_seconds": 1.5,
        "chain_seconds": 1.2,
    }
    assert Evaluated(4, 1.0, "test", 0.3, 0.1).as_record() == {
        "kind": "eval", "round": 4, "epoch": 1.0, "split": "test", "loss": 0.3, "error": 0.1,
    }  # fmt: skip
    assert StateChanged("failed", "replica 0: NaN", 7).as_record() == {
        "kind": "state", "state": "failed", "message": "replica 0: NaN", "round": 7,
    }  # fmt: skip
    assert CheckpointWritten(8, "/x/ckpt", 0.2).as_record() == {
        "kind": "checkpoint", "round": 8, "path": "/x/ckpt", "seconds": 0.2,
    }  # fmt: skip
    failed = {"kind": "checkpoint_failed", "round": 8, "error": "disk full"}
    assert CheckpointFailed(8, "disk full").as_record() == failed
    for event in (round_closed, Evaluated(4, 1.0, "test", 0.3, 0.1), Resumed(5, "round-state", None)):
        assert next(iter(event.as_record())) == "kind"
        json.dumps(event.as_record())  # a JSON line as it is


def test_joins_say_where_the_weights_came_from_and_leaves_do_not() -> None:
    assert MemberChanged("join", 1, 2, start="checkpoint").as_record() == {
        "kind": "member", "event": "join", "replica": 1, "workers": 2, "start": "checkpoint",
    }  # fmt: skip
    assert MemberChanged("lease", 1, 1).as_record() == {"kind": "member", "event": "lease", "replica": 1, "workers": 1}


def test_a_resume_record_says_from() -> None:
    assert Resumed(5, "round-state", None).as_record() == {
        "kind": "resume", "round": 5, "from": "round-state", "checkpoint": None,
    }  # fmt: skip
