"""Langevin noise from ``worker.noise.NoiseStream``: N(0, I) (moments, tails and a Kolmogorov-Smirnov
statistic on millions of draws, with checks shown to reject slightly wrong samples), the kernel's bits
equal to SplitMix64's and to its numpy reference's (any slice of pairs on its own too), reproducible from
the seed, checkpointable mid-stream, and a run resumed from a
checkpoint with the counter-based noise path on ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import worker.normal_kernel as normal_kernel
from cluster.local import run_local
from protos.spec import resolve
from worker.kernels import ChainHyper, langevin_step_
from worker.noise import SMALL, NoiseStream, normal_like
from worker.normal_kernel import add_normal, fill_normal, fill_reference
from worker.replica_rng import ReplicaRng

BIG = 3 * SMALL + 12_345  # the counter-based path; odd


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
    parts = first[: 3 * SMALL].view(3, SMALL)
    assert float(torch.corrcoef(parts).triu(1).abs().max()) < 0.01  # parts of a buffer are independent


def normality_failures(sample: torch.Tensor) -> list[str]:
    """What in ``sample`` is not i.i.d. N(0, 1), at about five standard errors (about 1e-3 for the KS
    statistic): mean, variance, kurtosis, two tail fractions, the Kolmogorov-Smirnov distance, and the
    correlation of neighbours and of their squares (one Box-Muller pair shares a radius)."""
    x = sample.double().flatten()
    n = x.numel()
    failures = []
    mean, var = float(x.mean()), float(x.var())
    if abs(mean) > 5 / math.sqrt(n):
        failures.append(f"mean {mean}")
    if abs(var - 1) > 5 * math.sqrt(2 / n):
        failures.append(f"variance {var}")
    kurtosis = float(((x - mean) ** 4).mean()) / var**2
    if abs(kurtosis - 3) > 5 * math.sqrt(24 / n):
        failures.append(f"kurtosis {kurtosis}")
    for t in (3.0, 4.0):
        p = math.erfc(t / math.sqrt(2))
        count = int((x.abs() > t).sum())
        if abs(count - n * p) > 5 * math.sqrt(n * p * (1 - p)):
            failures.append(f"{count} beyond {t} sigma, expected {n * p:.0f}")
    cdf = torch.special.ndtr(x.sort().values)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))
    if ks > 1.95 / math.sqrt(n):  # the KS test's critical value at the 0.1% level
        failures.append(f"Kolmogorov-Smirnov distance {ks}")
    pairs = x[: n // 2 * 2].view(-1, 2)
    for name, values in (("neighbours", pairs), ("squared neighbours", pairs**2)):
        corr = float(torch.corrcoef(values.T)[0, 1])
        if abs(corr) > 5 / math.sqrt(pairs.shape[0]):
            failures.append(f"correlation of {name} {corr}")
    return failures


@pytest.mark.timeout(120)
def test_millions_of_draws_pass_normality_checks_that_reject_slightly_wrong_samples() -> None:
    stream = NoiseStream().manual_seed(2024)
    sample = torch.cat(_draws(stream, 1 << 21, 2))  # 4.2M numbers, two draws
    assert normality_failures(sample) == []
    # The same checks catch a 1% wider normal, a 0.005 shift, and pairs that share their angle.
    assert any("Kolmogorov" in f for f in normality_failures(sample * 1.01))
    assert any("variance" in f for f in normality_failures(sample * 1.01))
    assert any("mean" in f for f in normality_failures(sample + 0.005))
    assert any("Kolmogorov" in f for f in normality_failures(sample + 0.005))
    shared = sample.view(-1, 2).clone()
    shared[:, 1] = shared[:, 0].abs() * shared[:, 1].sign()
    assert any("squared neighbours" in f for f in normality_failures(shared))


def _splitmix64(key: int, n: int) -> int:
    mask = 2**64 - 1
    z = (key + n * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_kernel_is_splitmix64_then_box_muller() -> None:
    assert _splitmix64(0, 1) == 0xE220A8397B1DCDAF  # SplitMix64 seeded with 0: its first output
    key, first = 0xDEADBEEF12345678, 1000
    out = np.empty(8, dtype=np.float32)
    fill_normal(out, key, first)
    for j in range(4):
        z = _splitmix64(key, first + j + 1)
        radius = math.sqrt(-2 * math.log(((z >> 40) + 1) / 2**24))
        angle_bits = (z & 0xFFFFFFFF) >> 8  # a quarter turn (2 bits), then 22 bits of angle within it
        angle = (angle_bits >> 22) * math.pi / 2 + ((angle_bits & 0x3FFFFF) - 2**21 + 0.5) * math.pi / 2**23
        assert out[2 * j] == pytest.approx(radius * math.cos(angle), rel=1e-6, abs=1e-6)
        assert out[2 * j + 1] == pytest.approx(radius * math.sin(angle), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 300_001])
def test_kernel_and_numpy_reference_give_the_same_bits(n: int) -> None:
    for key, first in ((0, 0), (2**64 - 1, 2**40 + 3), (12345, 77)):
        fast, reference = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        fill_normal(fast, key, first)
        fill_reference(reference, key, first)
        assert np.array_equal(fast.view(np.uint32), reference.view(np.uint32))
        y = np.linspace(-1, 1, n, dtype=np.float32)
        expected = y + np.float32(0.25) * reference  # float32 multiply, then float32 add
        add_normal(y, 0.25, key, first)
        assert np.array_equal(y.view(np.uint32), expected.view(np.uint32))
        if n > 2:  # any slice of whole pairs on its own
            part = np.empty(n - 2, dtype=np.float32)
            fill_normal(part, key, first + 1)
            assert np.array_equal(part.view(np.uint32), fast[2:].view(np.uint32))


def test_without_numba_the_numpy_reference_fills_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 300_001  # more than one of the reference's blocks
    fast = np.empty(n, dtype=np.float32)
    fill_normal(fast, 99, 5)
    monkeypatch.setattr(normal_kernel, "_kernel", lambda: None)
    assert not normal_kernel.fast()
    slow = np.empty(n, dtype=np.float32)
    fill_normal(slow, 99, 5)
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))
    y = np.ones(n, dtype=np.float32)
    add_normal(y, 0.5, 99, 5)
    assert np.array_equal(y.view(np.uint32), (np.float32(1) + np.float32(0.5) * fast).view(np.uint32))


def test_fill_normal_rejects_what_it_cannot_fill() -> None:
    for bad in (np.empty(10, dtype=np.float64), np.empty((2, 5), dtype=np.float32), np.empty(20, np.float32)[::2]):
        with pytest.raises(ValueError, match="contiguous float32 vector"):
            fill_normal(bad, 0, 0)


def test_same_seed_same_noise_and_a_draw_is_the_streams_next_outputs() -> None:
    reference = _draws(NoiseStream().manual_seed(3), BIG, 3)
    again = _draws(NoiseStream().manual_seed(3), BIG, 3)
    assert all(torch.equal(a, b) for a, b in zip(reference, again, strict=True))
    stream = NoiseStream().manual_seed(3)
    _draws(stream, BIG, 1)
    state = stream.stream_state()
    assert state is not None
    whole = np.empty(3 * (BIG + 1), dtype=np.float32)  # three draws of BIG (odd): each drops its last sine
    fill_normal(whole, int(state[0, 0]), 0)
    for k in range(3):
        start = k * (BIG + 1)
        assert np.array_equal(reference[k].numpy(), whole[start : start + BIG])
    other = _draws(NoiseStream().manual_seed(4), BIG, 1)
    assert not torch.equal(reference[0], other[0])


def test_restored_state_continues_the_stream_exactly() -> None:
    stream = NoiseStream().manual_seed(7)
    _draws(stream, BIG, 2)
    root, chunks = stream.get_state(), stream.stream_state()
    assert chunks is not None and chunks.dtype == torch.int64 and chunks.shape == (1, 2)
    assert int(chunks[0, 1]) == 2 * ((BIG + 1) // 2)  # two draws of ceil(BIG / 2) pairs
    expected = _draws(stream, BIG, 3)

    resumed = NoiseStream().manual_seed(99)
    resumed.set_state(root)
    resumed.load_stream_state(chunks)
    assert all(torch.equal(a, b) for a, b in zip(expected, _draws(resumed, BIG, 3), strict=True))

    stream.load_stream_state(chunks)  # the same stream rolled back
    assert all(torch.equal(a, b) for a, b in zip(expected, _draws(stream, BIG, 3), strict=True))


def test_bad_stream_states_are_refused_and_change_nothing() -> None:
    stream = NoiseStream().manual_seed(8)
    _draws(stream, BIG, 1)
    before = stream.stream_state()
    assert before is not None
    for bad, match in (
        (torch.zeros(4, 6, dtype=torch.int64), "former per-chunk SFC64"),
        (torch.zeros(1, 2, dtype=torch.float32), "expected int64"),
        (torch.tensor([[1, -5]]), "outputs used must be >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            stream.load_stream_state(bad)
        assert torch.equal(stream.stream_state(), before)


def test_no_chunk_state_means_seeded_afresh_from_the_generator() -> None:
    stream = NoiseStream().manual_seed(5)
    root = stream.get_state()
    assert stream.stream_state() is None
    first = _draws(stream, BIG, 2)
    stream.set_state(root)
    stream.load_stream_state(None)
    assert all(torch.equal(a, b) for a, b in zip(first, _draws(stream, BIG, 2), strict=True))


def test_small_and_non_float32_buffers_draw_like_torch_randn() -> None:
    for like in (torch.empty(1000), torch.empty(SMALL), torch.empty(BIG, dtype=torch.float64)):
        ours = normal_like(like, NoiseStream().manual_seed(11))
        theirs = torch.randn(like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(11))
        assert torch.equal(ours, theirs)
    torch.manual_seed(2)
    global_draw = normal_like(torch.empty(10), None)
    torch.manual_seed(2)
    assert torch.equal(global_draw, torch.randn(10))


def test_add_normal_adds_what_normal_would_draw_in_one_pass() -> None:
    y0 = torch.linspace(-3, 3, BIG)
    y, fused = y0.clone(), NoiseStream().manual_seed(6)
    fused.add_normal_(y, 0.3)
    fused.add_normal_(y, 0.3)
    plain = NoiseStream().manual_seed(6)
    expected = y0.numpy().copy()
    for _ in range(2):
        expected = expected + np.float32(0.3) * plain.normal(y0).numpy()
    assert np.array_equal(y.numpy().view(np.uint32), expected.view(np.uint32))
    assert torch.equal(fused.stream_state(), plain.stream_state())
    small = torch.zeros(1000)  # below the counter-based path: torch.randn, then add_
    NoiseStream().manual_seed(2).add_normal_(small, 0.5)
    assert torch.equal(small, 0.5 * torch.randn(1000, generator=torch.Generator().manual_seed(2)))


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
    assert state["rng_noise_chunks"].shape == (1, 2)
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
