"""``parle eval``: evaluate a run's reference (its final reference or a checkpoint) on test and train."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.checkpoint import CheckpointStore
from protos.spec import JobSpec
from worker.flat import FlatParameters
from worker.workloads import build_model, evaluate, load_dataset, reestimate_batchnorm


def load_reference(run_dir: Path, checkpoint: Path | None = None) -> tuple[torch.Tensor, str]:
    """The flat reference and where it came from: a given checkpoint, the final reference, or the
    newest good checkpoint."""
    store = CheckpointStore(run_dir / "checkpoints")
    if checkpoint is not None:
        return store.verify(checkpoint).tensors["reference"], str(checkpoint)
    final = run_dir / "reference.safetensors"
    if final.is_file():
        return load_file(str(final))["reference"], str(final)
    latest = store.latest()
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no reference.safetensors and no good checkpoint")
    return latest.tensors["reference"], str(latest.path)


def evaluate_reference(spec: JobSpec, reference: torch.Tensor) -> dict[str, tuple[float, float]]:
    data = load_dataset(spec.data, seed=spec.seed).to(spec.device)
    model = build_model(spec.model, data.input_shape, data.num_classes).to(spec.device)
    FlatParameters(model.parameters()).load_(reference.to(spec.device))
    with torch.no_grad():
        reestimate_batchnorm(model, data.train_x, spec.data.batch_size, spec.data.bn_batches)
    subset = spec.eval.train_subset or len(data.train_x)
    return {
        "test": evaluate(model, data.test_x, data.test_y, spec.data.test_batch_size),
        "train": evaluate(model, data.train_x[:subset], data.train_y[:subset], spec.data.test_batch_size),
    }
