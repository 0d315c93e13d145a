"""Workloads: the models, datasets, per-replica sampling and evaluation a worker trains with."""

from worker.workloads.datasets import Dataset, clear_cache, load_dataset, make_synthetic, read_idx
from worker.workloads.errors import WorkloadError
from worker.workloads.evaluation import evaluate, reestimate_batchnorm
from worker.workloads.models import BUILTIN_MODELS, build_model, count_parameters
from worker.workloads.sampling import BatchSampler, crop_and_flip, shard_indices

__all__ = [
    "BUILTIN_MODELS",
    "BatchSampler",
    "Dataset",
    "WorkloadError",
    "build_model",
    "clear_cache",
    "count_parameters",
    "crop_and_flip",
    "evaluate",
    "load_dataset",
    "make_synthetic",
    "read_idx",
    "reestimate_batchnorm",
    "shard_indices",
]
