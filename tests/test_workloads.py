"""Workloads: model sizes and errors, dataset decoding, shards and batch order, evaluation and BN
re-estimation, each against a closed form or a value computed independently in the test."""

from __future__ import annotations

import gzip
import pickle
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from protos.spec import DataSpec, ModelSpec
from worker.workloads import (
    BatchSampler,
    WorkloadError,
    build_model,
    clear_cache,
    count_parameters,
    evaluate,
    load_dataset,
    reestimate_batchnorm,
    shard_indices,
)

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize(("name", "expected"), [("mnistfc", 1_867_786), ("lenet", 132_220)])
def test_paper_parameter_counts(name: str, expected: int) -> None:
    model = build_model(ModelSpec(name=name), (1, 28, 28), 10)
    assert count_parameters(model) == expected
    model.eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["allcnn", "wrn"])
def test_cifar_models_forward_shape(name: str) -> None:
    model = build_model(ModelSpec(name=name, depth=10, width=1), (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_wrn_28_10_size() -> None:
    # The Parle paper's WRN-28-10 has 36.5M parameters.
    model = build_model(ModelSpec(name="wrn", depth=28, width=10), (3, 32, 32), 10)
    assert count_parameters(model) == 36_479_194


@pytest.mark.parametrize("depth", [4, 12, 15])
def test_wrn_depth_validated(depth: int) -> None:
    with pytest.raises(WorkloadError, match=r"model\.depth.*6n \+ 4"):
        build_model(ModelSpec(name="wrn", depth=depth, width=1), (3, 32, 32), 10)


def test_unknown_model_names_allowed() -> None:
    with pytest.raises(WorkloadError, match=r"model\.name.*'resnet'.*mnistfc, lenet, allcnn, wrn"):
        build_model(ModelSpec(name="resnet"), (1, 28, 28), 10)


def test_builtin_rejects_options() -> None:
    with pytest.raises(WorkloadError, match=r"model\.options.*hidden"):
        build_model(ModelSpec(name="lenet", options={"hidden": 3}), (1, 28, 28), 10)


def test_init_is_deterministic_under_manual_seed() -> None:
    torch.manual_seed(5)
    a = build_model(ModelSpec(name="lenet"), (1, 28, 28), 10)
    torch.manual_seed(5)
    b = build_model(ModelSpec(name="lenet"), (1, 28, 28), 10)
    c = build_model(ModelSpec(name="lenet"), (1, 28, 28), 10)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pb, pc) for pb, pc in zip(b.parameters(), c.parameters(), strict=True))


_USER_MODULE = """
import torch

def tiny(num_classes, input_shape, hidden=4):
    c, h, w = input_shape
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(c * h * w, hidden), torch.nn.Linear(hidden, num_classes)
    )

def not_a_module(num_classes, input_shape):
    return 42

def broken(num_classes, input_shape):
    raise RuntimeError("boom")

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "userpkg_workloads"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(_USER_MODULE))
    (pkg / "bad.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg_workloads"


def test_user_model_gets_shape_and_options(user_package: str) -> None:
    spec = ModelSpec(name=f"{user_package}.nets:tiny", options={"hidden": 6})
    model = build_model(spec, (1, 5, 5), 3)
    assert count_parameters(model) == 25 * 6 + 6 + 6 * 3 + 3
    assert model(torch.zeros(2, 1, 5, 5)).shape == (2, 3)


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (":tiny", "expected package.module:callable"),
        ("nowhere_xyz.nets:tiny", "cannot import nowhere_xyz.nets"),
        ("{pkg}.bad:tiny", "cannot import .*missing dependency xyz"),
        ("{pkg}.nets:absent", "has no attribute absent"),
        ("{pkg}.nets:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
        ("{pkg}.nets:not_a_module", "returned int, expected a torch.nn.Module"),
        ("{pkg}.nets:broken", "raised RuntimeError: boom"),
    ],
)
def test_user_model_errors(user_package: str, target: str, problem: str) -> None:
    name = target.format(pkg=user_package)
    with pytest.raises(WorkloadError, match=rf"^model\.name: .*{problem}") as info:
        build_model(ModelSpec(name=name), (1, 5, 5), 3)
    assert "\n" not in str(info.value)


def test_user_model_options_may_not_override_shape(user_package: str) -> None:
    spec = ModelSpec(name=f"{user_package}.nets:tiny", options={"num_classes": 4})
    with pytest.raises(WorkloadError, match=r"model\.options: num_classes"):
        build_model(spec, (1, 5, 5), 3)


# ----------------------------------------------------------------------------------------- sampling


def test_shard_full_fraction_is_every_index_in_global_order() -> None:
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(9))
    for replica in range(3):
        shard = shard_indices(50, replica, 3, 1.0, seed=9)
        assert shard.dtype == torch.int64
        assert sorted(shard.tolist()) == list(range(50))
    assert torch.equal(shard_indices(50, 0, 3, 1.0, seed=9), perm)


def test_shard_halves_are_disjoint_and_cover() -> None:
    a = set(shard_indices(101, 0, 2, 0.5, seed=1).tolist())
    b = set(shard_indices(101, 1, 2, 0.5, seed=1).tolist())
    assert len(a) == len(b) == 50  # round(50.5) = 50
    assert not a & b
    shard_a = shard_indices(100, 0, 2, 0.5, seed=1)
    shard_b = shard_indices(100, 1, 2, 0.5, seed=1)
    assert sorted(torch.cat([shard_a, shard_b]).tolist()) == list(range(100))


@pytest.mark.parametrize(("n", "frac"), [(3, 0.2), (4, 0.5), (6, 0.3), (5, 1.0)])
def test_shard_offsets_and_wrapping(n: int, frac: float) -> None:
    num = 37
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(4)).tolist()
    length = max(1, round(frac * num))
    for replica in range(n + 2):  # replicas >= n wrap around: (a / n mod 1)
        start = int(((replica / n) % 1) * num)
        expected = [perm[(start + i) % num] for i in range(length)]
        assert shard_indices(num, replica, n, frac, seed=4).tolist() == expected


def test_shard_wraps_past_the_end() -> None:
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2)).tolist()
    # Replica 2 of 3 starts at floor(2/3 * 10) = 6 and needs 6 samples: positions 6..9 then 0, 1.
    assert shard_indices(10, 2, 3, 0.6, seed=2).tolist() == [perm[i] for i in (6, 7, 8, 9, 0, 1)]


def test_shard_deterministic_and_seed_dependent() -> None:
    assert torch.equal(shard_indices(1000, 1, 4, 0.25, 7), shard_indices(1000, 1, 4, 0.25, 7))
    assert not torch.equal(shard_indices(1000, 1, 4, 0.25, 7), shard_indices(1000, 1, 4, 0.25, 8))
    assert shard_indices(5, 0, 1, 0.01, 0).numel() == 1


def test_shard_rejects_bad_frac() -> None:
    with pytest.raises(ValueError, match="frac"):
        shard_indices(10, 0, 1, 0.0, 0)


def _sampler(replica: int = 0, seed: int = 0, n: int = 23, batch: int = 5) -> BatchSampler:
    x = torch.arange(100, dtype=torch.float32).view(100, 1) * 10
    y = torch.arange(100)
    return BatchSampler(torch.arange(10, 10 + n), x, y, batch, seed=seed, replica=replica)


def _draw(sampler: BatchSampler, count: int) -> list[list[int]]:
    return [sampler.next_batch()[1].tolist() for _ in range(count)]


def test_sampler_reproducible_and_replica_dependent() -> None:
    assert _draw(_sampler(), 12) == _draw(_sampler(), 12)
    assert _draw(_sampler(replica=0), 4) != _draw(_sampler(replica=1), 4)
    assert _draw(_sampler(seed=0), 4) != _draw(_sampler(seed=1), 4)
    x, y = _sampler().next_batch()
    assert torch.equal(x[:, 0], y.float() * 10)  # inputs and labels indexed together


def test_sampler_epochs_drop_partial_batch_and_reshuffle() -> None:
    sampler = _sampler(n=23, batch=5)
    assert sampler.batches_per_epoch == 4
    epoch0 = _draw(sampler, 4)
    assert sampler.epochs_done == 1.0
    epoch1 = _draw(sampler, 4)
    for epoch in (epoch0, epoch1):
        flat = [i for batch in epoch for i in batch]
        assert len(flat) == len(set(flat)) == 20  # 3 of 23 dropped, no repeats within an epoch
        assert set(flat) <= set(range(10, 33))
    assert epoch0 != epoch1
    assert sampler.state() == {"epoch": 1, "position": 4}
    _draw(sampler, 1)
    assert sampler.state() == {"epoch": 2, "position": 1}
    assert sampler.epochs_done == pytest.approx(2.25)


def test_sampler_resumes_exactly() -> None:
    original = _sampler(replica=2, seed=3)
    _draw(original, 6)
    state = original.state()
    resumed = _sampler(replica=2, seed=3)
    resumed.load_state(state)
    assert resumed.epochs_done == original.epochs_done
    assert _draw(resumed, 9) == _draw(original, 9)


def test_sampler_small_shard_is_one_batch() -> None:
    sampler = _sampler(n=3, batch=8)
    assert sampler.batches_per_epoch == 1
    assert sorted(sampler.next_batch()[1].tolist()) == [10, 11, 12]


def test_sampler_augment_crops_and_flips_deterministically() -> None:
    x = torch.randn(16, 3, 8, 8)
    make = lambda: BatchSampler(torch.arange(16), x, torch.arange(16), 16, 0, 0, augment=True)  # noqa: E731
    xa, ya = make().next_batch()
    xb, _ = make().next_batch()
    assert xa.shape == (16, 3, 8, 8) and torch.equal(xa, xb)
    # Each augmented image is a padded crop of its source, possibly mirrored.
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    for img, label in zip(xa, ya.tolist(), strict=True):
        windows = [padded[label, :, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(2)) for w in windows)


# ----------------------------------------------------------------------------------------- datasets


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _write_mnist(root: Path, rng: np.random.Generator, gz_train: bool = True) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4),
    }
    for base, array in arrays.items():
        suffix = ".gz" if base.startswith("train") == gz_train else ""
        _write_idx(root / f"{base}{suffix}", array, 2051 if array.ndim == 3 else 2049)
    return arrays


def test_idx_mnist_gz_and_raw(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path, np.random.default_rng(0))
    clear_cache()
    data = load_dataset(DataSpec(name="mnist", root=tmp_path))
    assert data.train_x.shape == (12, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (4, 1, 28, 28) and data.test_y.dtype == torch.int64
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and data.name == "mnist"
    expected = (arrays["train-images-idx3-ubyte"] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(data.train_x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Cached: a second load is the same object, shared by replicas in one process.
    assert load_dataset(DataSpec(name="mnist", root=tmp_path)) is data


def test_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, np.random.default_rng(1))
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    _write_idx(bad, np.zeros(4), 2051)
    clear_cache()
    with pytest.raises(WorkloadError, match=rf"{re.escape(str(bad))}.*magic 2051.*2049"):
        load_dataset(DataSpec(name="mnist", root=tmp_path))


def test_idx_truncated_names_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, np.random.default_rng(2))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    clear_cache()
    with pytest.raises(WorkloadError, match=rf"{re.escape(str(path))}: truncated"):
        load_dataset(DataSpec(name="mnist", root=tmp_path))


def test_missing_directory_and_file_name_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    here, gone = re.escape(str(tmp_path)), re.escape(str(missing))
    with pytest.raises(WorkloadError, match=rf"^data\.root: {gone}: no such directory \(mnist needs"):
        load_dataset(DataSpec(name="mnist", root=missing))
    with pytest.raises(WorkloadError, match=rf"^data\.root: {here}: missing train-images-idx3-ubyte"):
        load_dataset(DataSpec(name="mnist", root=tmp_path))
    with pytest.raises(WorkloadError, match=rf"^data\.root: {gone}: no such directory \(cifar10"):
        load_dataset(DataSpec(name="cifar10", root=missing))


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar_python_batches(tmp_path: Path, subdir: str) -> None:
    directory = tmp_path / subdir
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    batches: dict[str, dict[bytes, Any]] = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"labels": [1, 0, 9]}
        batches[name] = batch
        with (directory / name).open("wb") as f:
            pickle.dump(batch, f)
    clear_cache()
    data = load_dataset(DataSpec(name="cifar10", root=tmp_path))
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_y.tolist() == [1, 0, 9] * 5 and data.train_y.dtype == torch.int64
    assert data.input_shape == (3, 32, 32)
    raw = batches["data_batch_2"][b"data"].reshape(3, 3, 32, 32)[:, 1] / 255.0
    np.testing.assert_allclose(data.train_x[3:6, 1].numpy(), (raw - 0.4822) / 0.2435, rtol=1e-5, atol=1e-5)


def test_fashion_mnist_from_debian_package() -> None:
    data = load_dataset(DataSpec(name="fashion-mnist"))
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.shape == (60000,) and data.test_y.shape == (10000,)
    assert data.train_y.min().item() == 0 and data.train_y.max().item() == 9
    assert set(data.test_y.unique().tolist()) == set(range(10))
    # Normalised with the training split's own statistics.
    assert abs(data.train_x.mean().item()) < 0.01 and abs(data.train_x.std().item() - 1) < 0.01


def test_synthetic_deterministic_and_learnable() -> None:
    spec = DataSpec(name="synthetic", synthetic_size=256)
    clear_cache()
    a = load_dataset(spec, seed=1)
    clear_cache()
    b = load_dataset(spec, seed=1)
    assert a is not b and torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(load_dataset(spec, seed=2).train_x, a.train_x)
    assert a.train_x.shape == (256, 1, 28, 28) and a.test_x.shape == (64, 1, 28, 28)
    # Nearest class mean (from the training split) classifies the test split far better than chance.
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(a.test_x.flatten(1), means).argmin(1)
    assert (predicted != a.test_y).float().mean().item() < 0.3


def test_dataset_to_device_copies() -> None:
    data = load_dataset(DataSpec(name="synthetic", synthetic_size=16))
    moved = data.to("cpu")
    assert moved.train_x.device.type == "cpu" and moved.name == data.name


# --------------------------------------------------------------------------------------- evaluation


class _AlwaysZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 4)
        logits[:, 0] = 1.0
        return logits


def test_evaluate_error_and_loss_closed_form() -> None:
    y = torch.tensor([0, 1, 0, 3, 2, 0, 0])
    model = _AlwaysZero().train()
    loss, err = evaluate(model, torch.zeros(7, 2), y, batch_size=3)
    assert err == pytest.approx(3 / 7)
    # softmax of (1, 0, 0, 0): -log p = log(e + 3) - 1 for class 0, log(e + 3) otherwise.
    expected = (4 * (np.log(np.e + 3) - 1) + 3 * np.log(np.e + 3)) / 7
    assert loss == pytest.approx(expected)
    assert model.training  # mode restored


def test_evaluate_uses_eval_mode() -> None:
    model = nn.Sequential(nn.Dropout(0.9), nn.Linear(3, 2))
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    loss, err = evaluate(model, x, y, 8)
    logits = model[1](x)  # dropout 0.9 would make this wildly different in train mode
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert err == pytest.approx((logits.argmax(1) != y).float().mean().item())


def test_reestimate_batchnorm_closed_form() -> None:
    torch.manual_seed(0)
    first, linear, second = nn.BatchNorm1d(12, momentum=0.3), nn.Linear(12, 6), nn.BatchNorm1d(6)
    model = nn.Sequential(nn.Flatten(), first, nn.Dropout(0.5), linear, second)
    model.eval()
    x = torch.randn(40, 3, 4) * 2 + 5
    reestimate_batchnorm(model, x, batch_size=8, num_batches=3)
    used = x[:24].flatten(1)
    assert first.running_mean is not None and second.running_mean is not None
    torch.testing.assert_close(first.running_mean, used.mean(0))
    assert first.num_batches_tracked is not None and int(first.num_batches_tracked) == 3
    assert first.momentum == 0.3 and second.momentum == 0.1  # momenta restored
    assert not any(m.training for m in model.modules())  # modes restored
    # The second BN saw dropout-free activations: its mean is the mean of Linear(bn(x)) per batch.
    batch_means = []
    for i in range(3):
        xb = x[i * 8 : (i + 1) * 8].flatten(1)
        normed = (xb - xb.mean(0)) / torch.sqrt(xb.var(0, unbiased=False) + first.eps)
        batch_means.append(linear(normed * first.weight + first.bias).mean(0))
    torch.testing.assert_close(second.running_mean, torch.stack(batch_means).mean(0))


def test_reestimate_batchnorm_restores_train_mode_and_is_deterministic() -> None:
    last = nn.BatchNorm1d(5)
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 5), last)
    model.train()
    x = torch.randn(30, 5)
    reestimate_batchnorm(model, x, 10, 2)
    assert last.running_var is not None
    first = last.running_var.clone()
    reestimate_batchnorm(model, x, 10, 2)
    torch.testing.assert_close(last.running_var, first)  # dropout off: no randomness
    assert all(m.training for m in model.modules())


def test_reestimate_batchnorm_without_bn_is_noop() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    before = [p.clone() for p in model.parameters()]
    reestimate_batchnorm(model, torch.randn(4, 3), 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
