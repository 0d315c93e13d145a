"""The coordinator's Prometheus metrics (prefix ``parle_``, base units, counters
end in ``_total``, low-cardinality labels: job ids are labels, worker ids never are).

``JobMetrics`` turns a job's events into metric updates; the gRPC server adds rejections and bytes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

ROUNDS = Counter("parle_rounds_total", "Rounds closed", ["job_id"])
ROUND_SECONDS = Histogram(
    "parle_round_duration_seconds",
    "Wall-clock from a round's opening to its close",
    ["job_id"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
LIVE_WORKERS = Gauge("parle_live_workers", "Workers holding a lease on the job", ["job_id"])
MEMBERSHIP = Counter(
    "parle_membership_events_total", "Workers joining, leaving, or missing their lease", ["job_id", "event"]
)
REJECTED = Counter("parle_rejected_updates_total", "Requests refused before touching state, by reason", ["reason"])
INTERNAL_ERRORS = Counter(
    "parle_internal_errors_total", "Calls answered INTERNAL: a coordinator bug (traceback in its log)", ["method"]
)
CHECKPOINT_FAILURES = Counter(
    "parle_checkpoint_failures_total", "Checkpoints that could not be written (disk full, I/O error)", ["job_id"]
)
EVENT_LOG_FAILURES = Counter(
    "parle_event_log_failures_total", "Job events that could not be appended to metrics.jsonl (disk full)"
)
EXCHANGE_BYTES = Counter("parle_exchange_bytes_total", "Tensor bytes exchanged with workers", ["direction"])
GAMMA = Gauge("parle_gamma", "Langevin coupling gamma of the last closed round", ["job_id"])
RHO = Gauge("parle_rho", "Elastic coupling rho of the last closed round", ["job_id"])
LEARNING_RATE = Gauge("parle_learning_rate", "Outer learning rate of the last closed round", ["job_id"])
TRAIN_LOSS = Gauge("parle_train_loss", "Mean training loss of the replicas' last round", ["job_id"])
EVAL_LOSS = Gauge("parle_eval_loss", "Loss of the reference at the last evaluation", ["job_id", "split"])
EVAL_ERROR = Gauge(
    "parle_eval_error_ratio", "Error of the reference at the last evaluation (0..1)", ["job_id", "split"]
)
CONSENSUS = Gauge("parle_consensus_distance", "RMS distance of the coupled averages to the new reference", ["job_id"])
JOB_STATE = Gauge("parle_job_state", "1 for the job's current state, 0 for the others", ["job_id", "state"])
CHECKPOINTS = Counter("parle_checkpoints_total", "Checkpoints written", ["job_id"])
CHECKPOINT_SECONDS = Histogram("parle_checkpoint_duration_seconds", "Time to write a checkpoint", ["job_id"])
EPOCH = Gauge("parle_epoch", "Data passes per replica at the last closed round", ["job_id"])
OPEN_STREAMS = Gauge("parle_open_streams", "Streaming calls being served, by method", ["method"])
INFLIGHT_BYTES = Gauge("parle_upload_bytes_in_flight", "Upload bytes reserved by Exchange and Report streams")

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
PER_JOB = (
    ROUNDS,
    ROUND_SECONDS,
    LIVE_WORKERS,
    MEMBERSHIP,
    GAMMA,
    RHO,
    LEARNING_RATE,
    TRAIN_LOSS,
    EVAL_LOSS,
    EVAL_ERROR,
    CONSENSUS,
    JOB_STATE,
    CHECKPOINTS,
    CHECKPOINT_SECONDS,
    CHECKPOINT_FAILURES,
    EPOCH,
)


def remove_job(job_id: str) -> None:
    """Drop every series of a job (its label is always the first)."""
    for metric in PER_JOB:
        children: dict[tuple[str, ...], Any] = getattr(metric, "_metrics", {})
        for labels in [labels for labels in list(children) if labels and labels[0] == job_id]:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)


class JobMetrics:
    """A job listener: one call per event."""

    def __init__(self, job_id: str) -> None:
        self.job = job_id

    def __call__(self, event: dict[str, Any]) -> None:
        kind, job = event.get("kind"), self.job
        if kind == "round":
            ROUNDS.labels(job).inc()
            ROUND_SECONDS.labels(job).observe(event["round_seconds"])
            GAMMA.labels(job).set(event["gamma"])
            RHO.labels(job).set(event["rho"])
            LEARNING_RATE.labels(job).set(event["lr"])
            TRAIN_LOSS.labels(job).set(event["train_loss"])
            CONSENSUS.labels(job).set(event["consensus_distance"])
            EPOCH.labels(job).set(event["epoch"])
        elif kind == "eval":
            EVAL_LOSS.labels(job, event["split"]).set(event["loss"])
            EVAL_ERROR.labels(job, event["split"]).set(event["error"])
        elif kind == "member":
            MEMBERSHIP.labels(job, event["event"]).inc()
            LIVE_WORKERS.labels(job).set(event["workers"])
        elif kind == "checkpoint":
            CHECKPOINTS.labels(job).inc()
            CHECKPOINT_SECONDS.labels(job).observe(event["seconds"])
        elif kind == "checkpoint_failed":
            CHECKPOINT_FAILURES.labels(job).inc()
        elif kind == "state":
            for state in STATES:
                JOB_STATE.labels(job, state).set(1.0 if state == event["state"] else 0.0)
