"""Langevin noise from ``worker.noise.NoiseStream``: N(0, I), reproducible from the seed whatever the thread
count, checkpointable mid-stream (what was drawn ahead is thrown away on restore), and a run resumed from a
checkpoint with the parallel noise path on ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import worker.noise as noise
from cluster.local import run_local
from protos.spec import resolve
from worker.kernels import ChainHyper, langevin_step_
from worker.noise import CHUNK, NoiseStream, normal_like
from worker.replica_rng import ReplicaRng

BIG = 3 * CHUNK + 12_345  # four chunks, the last one partial and odd


def _draws(stream: NoiseStream, n: int, count: int) -> list[torch.Tensor]:
    like = torch.empty(n)
    return [stream.normal(like).clone() for _ in range(count)]


def test_draws_are_standard_normal_and_change_every_step() -> None:
    first, second = _draws(NoiseStream().manual_seed(0), BIG, 2)
    assert first.dtype == torch.float32 and first.shape == (BIG,)
    assert not torch.equal(first, second)
    both = torch.cat([first, second]).double()
    assert abs(float(both.mean())) < 0.01 and abs(float(both.std()) - 1) < 0.01
    assert abs(float((both**4).mean()) - 3) < 0.05  # the normal's kurtosis, not a uniform's or a sum's
    assert float(torch.corrcoef(torch.stack([first, second]))[0, 1]) == pytest.approx(0, abs=0.01)
    chunks = first[: 3 * CHUNK].view(3, CHUNK)
    assert float(torch.corrcoef(chunks).triu(1).abs().max()) < 0.01  # chunk streams are independent


def test_same_seed_same_noise_whatever_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _draws(NoiseStream().manual_seed(3), BIG, 3)
    for threads in (1, 3):
        monkeypatch.setattr(noise, "pool_threads", lambda t=threads: t)
        again = _draws(NoiseStream().manual_seed(3), BIG, 3)
        assert all(torch.equal(a, b) for a, b in zip(reference, again, strict=True))
    other = _draws(NoiseStream().manual_seed(4), BIG, 1)
    assert not torch.equal(reference[0], other[0])


def test_restored_state_continues_the_stream_exactly() -> None:
    stream = NoiseStream().manual_seed(7)
    _draws(stream, BIG, 2)  # one more is already being drawn ahead
    root, chunks = stream.get_state(), stream.stream_state()
    assert chunks is not None and chunks.dtype == torch.int64 and chunks.shape[0] == 4
    expected = _draws(stream, BIG, 3)

    resumed = NoiseStream().manual_seed(99)
    resumed.set_state(root)
    resumed.load_stream_state(chunks)
    assert all(torch.equal(a, b) for a, b in zip(expected, _draws(resumed, BIG, 3), strict=True))

    stream.load_stream_state(chunks)  # the same stream rolled back, its draw ahead thrown away
    assert all(torch.equal(a, b) for a, b in zip(expected, _draws(stream, BIG, 3), strict=True))


def test_no_chunk_state_means_seeded_afresh_from_the_generator() -> None:
    stream = NoiseStream().manual_seed(5)
    root = stream.get_state()
    assert stream.stream_state() is None
    first = _draws(stream, BIG, 2)
    stream.set_state(root)
    stream.load_stream_state(None)
    assert all(torch.equal(a, b) for a, b in zip(first, _draws(stream, BIG, 2), strict=True))


def test_small_and_non_float32_buffers_draw_like_torch_randn() -> None:
    for like in (torch.empty(1000), torch.empty(CHUNK), torch.empty(BIG, dtype=torch.float64)):
        ours = normal_like(like, NoiseStream().manual_seed(11))
        theirs = torch.randn(like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(11))
        assert torch.equal(ours, theirs)
    torch.manual_seed(2)
    global_draw = normal_like(torch.empty(10), None)
    torch.manual_seed(2)
    assert torch.equal(global_draw, torch.randn(10))


def test_langevin_step_adds_the_streams_noise() -> None:
    hp = ChainHyper(gamma=0.0, inner_lr=0.01, inner_momentum=0.0, noise=1e-2, beta1=0.5, weight_decay=0.0)
    y, grad = torch.zeros(BIG), torch.zeros(BIG)
    langevin_step_(y, grad, torch.zeros(BIG), torch.zeros(BIG), torch.zeros(BIG), hp, NoiseStream().manual_seed(1))
    eps = _draws(NoiseStream().manual_seed(1), BIG, 1)[0]
    assert torch.equal(y, torch.zeros(BIG).add_(eps, alpha=1e-2 * (2 * 0.01) ** 0.5))


def test_replica_rng_checkpoints_the_chunk_generators() -> None:
    rng = ReplicaRng(seed=0, replica=1, device=torch.device("cpu"))
    assert "rng_noise_chunks" not in rng.state()
    _draws(rng.noise, BIG, 2)
    state = rng.state()
    assert state["rng_noise_chunks"].shape == (4, 6)
    expected = _draws(rng.noise, BIG, 2)
    other = ReplicaRng(seed=0, replica=1, device=torch.device("cpu"))
    other.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, _draws(other.noise, BIG, 2), strict=True))


@pytest.mark.timeout(300)
def test_resumed_run_with_parallel_noise_is_bit_identical(tmp_path: Path) -> None:
    """A model with more than one noise chunk (the parallel path), noise on: resume from a middle checkpoint
    and end with the uninterrupted run's weights."""
    spec = resolve(
        {
            "name": "n",
            "preset": "parle",
            "replicas": 2,
            "epochs": 1,
            "model": {"name": "toy_models:mlp", "options": {"hidden": 400, "dropout": 0.2}},  # 318K parameters
            "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
            "optim": {"L": 2, "noise": 1e-3},
            "eval": {"every_epochs": 1},
            "checkpoint": {"every_rounds": 1, "keep": 8},
        }
    )
    straight = tmp_path / "straight"
    assert run_local(spec, straight).state.value == "succeeded"  # 4 rounds
    checkpoints = sorted((straight / "checkpoints").iterdir())
    assert len(checkpoints) >= 3
    assert load_file(str(checkpoints[1] / "tensors.safetensors")).keys() >= {"replica0.rng_noise_chunks"}

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("reference.safetensors", "final.safetensors"):
        (resumed / name).unlink(missing_ok=True)
    for later in sorted((resumed / "checkpoints").iterdir())[2:]:
        shutil.rmtree(later)
    assert run_local(spec, resumed, resume=True).state.value == "succeeded"
    a = load_file(str(straight / "reference.safetensors"))["reference"]
    b = load_file(str(resumed / "reference.safetensors"))["reference"]
    assert torch.equal(a, b)
