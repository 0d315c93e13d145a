"""The check every runtime's tests make: what a run hands back is the model, mean_a x_a of the replicas'
weights after their last elastic step (as the last checkpoint holds them), not the coupling center."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.checkpoint import CheckpointStore, unpack_job_state
from protos.spec import JobSpec
from worker.flat import FlatParameters
from worker.workloads import build_model


def mean_of_last_replicas(run_dir: Path, replicas: int) -> torch.Tensor:
    ckpt = CheckpointStore(run_dir / "checkpoints").latest()
    assert ckpt is not None, f"{run_dir}: no checkpoint"
    _, _, states = unpack_job_state(ckpt.tensors)
    assert sorted(states) == list(range(replicas)), f"checkpoint holds replicas {sorted(states)}"
    return torch.stack([states[a]["x"] for a in range(replicas)]).mean(0)


def assert_result_is_the_model(run_dir: Path, spec: JobSpec, input_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
    """reference.safetensors and the exported final.safetensors (the evaluated weights) equal mean_a x_a."""
    mean_x = mean_of_last_replicas(run_dir, spec.replicas)
    reference = load_file(str(run_dir / "reference.safetensors"))["reference"]
    assert torch.allclose(reference, mean_x, atol=1e-6), float((reference - mean_x).abs().max())
    net = build_model(spec.model, input_shape, 10)
    net.load_state_dict(load_file(str(run_dir / "final.safetensors")))
    exported = FlatParameters(net.parameters()).data
    assert torch.allclose(exported, mean_x, atol=1e-6), float((exported - mean_x).abs().max())
