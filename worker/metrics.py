"""A worker process's Prometheus metrics (served by `parle worker --metrics-port N`).

The scrape target identifies the worker, so worker ids are not labels; the job id is."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

ROUNDS = Counter("parle_worker_rounds_total", "Rounds this worker completed", ["job_id"])
INNER_STEPS = Counter("parle_worker_inner_steps_total", "Mini-batch steps (Langevin or gradient) taken", ["job_id"])
SAMPLES = Counter("parle_worker_samples_total", "Training samples processed", ["job_id"])
SAMPLES_PER_SECOND = Gauge("parle_worker_samples_per_second", "Training throughput of the last chain", ["job_id"])
CHAIN_SECONDS = Histogram(
    "parle_worker_chain_duration_seconds", "Time of one round's chain (compute)", ["job_id"], buckets=DURATION_BUCKETS
)
EXCHANGE_SECONDS = Histogram(
    "parle_worker_exchange_duration_seconds",
    "Time from sending the coupled average to holding the new reference (network + waiting for the round)",
    ["job_id"],
    buckets=DURATION_BUCKETS,
)
TRAIN_LOSS = Gauge("parle_worker_train_loss", "Mean training loss of this worker's last round", ["job_id"])
REJOINS = Counter("parle_worker_rejoins_total", "Times this worker lost its place and joined again", ["job_id"])
EXCHANGE_RETRIES = Counter(
    "parle_worker_exchange_retries_total",
    "Uploads sent again because the coordinator's byte budget was full",
    ["job_id"],
)
