"""Workloads: the models, datasets, per-replica sampling and evaluation a worker trains with."""

from worker.workloads.cifar import restricted_load
from worker.workloads.datasets import Dataset, cache_key, clear_cache, load_dataset, make_synthetic
from worker.workloads.errors import WorkloadError
from worker.workloads.evaluation import evaluate, reestimate_batchnorm
from worker.workloads.idx import read_idx
from worker.workloads.models import BUILTIN_MODELS, build_model, count_parameters
from worker.workloads.sampling import BatchSampler, crop_and_flip, shard_indices

__all__ = [
    "BUILTIN_MODELS",
    "BatchSampler",
    "Dataset",
    "WorkloadError",
    "build_model",
    "cache_key",
    "clear_cache",
    "count_parameters",
    "crop_and_flip",
    "evaluate",
    "load_dataset",
    "make_synthetic",
    "read_idx",
    "reestimate_batchnorm",
    "restricted_load",
    "shard_indices",
]
