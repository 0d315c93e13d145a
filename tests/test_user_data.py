"""Users' own data sets: IDX directories of any size, CIFAR-10/100 python batches, npz files and
``package.module:callable`` sets; ``data.train_limit`` and ``data.num_classes``; one-line errors naming
the file (or data.*) and the problem for every kind of bad data; a restricted unpickler; and the real
``parle train`` on a good and a bad directory. All data is generated here, under tmp_path."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from protos.spec import DataSpec, SpecError, resolve
from tests import user_data_fixtures
from worker.workloads import Dataset, WorkloadError, clear_cache, load_dataset

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = "tests.user_data_fixtures"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def _load(**fields: Any) -> Dataset:
    return load_dataset(DataSpec(**fields))


def _fails(problem: str, **fields: Any) -> str:
    """Load and expect a one-line WorkloadError matching ``problem``; returns the message."""
    with pytest.raises(WorkloadError) as info:
        _load(**fields)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(problem, message), message
    return message


# ---------------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)


def write_mnist(root: Path, n_train: int = 12, n_test: int = 4, gz: bool = False, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for base, array in arrays.items():
        write_idx(root / (f"{base}.gz" if gz else base), array)
    return arrays


@pytest.fixture(scope="module")
def big_idx(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, dict[str, Any]]]:
    """4,000 / 1,000 MNIST-format images, gzip-compressed and not."""
    base = tmp_path_factory.mktemp("idx")
    return {gz: (base / f"gz{gz}", write_mnist(base / f"gz{gz}", 4000, 1000, gz=gz)) for gz in (True, False)}


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_of_any_size(big_idx: dict[bool, tuple[Path, dict[str, Any]]], gz: bool) -> None:
    root, arrays = big_idx[gz]
    data = _load(name="mnist", root=root)
    assert data.train_x.shape == (4000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_size == 4000 and data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    expected = (arrays["train-images-idx3-ubyte"][:5] / 255.0 - 0.1307) / 0.3081  # MNIST's published stats
    np.testing.assert_allclose(data.train_x[:5, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # name idx: the same files, normalised with the training set's own statistics
    idx = _load(name="idx", root=root)
    assert idx.train_x.shape == (4000, 1, 28, 28) and idx.num_classes == 10 and idx.name == "idx"
    assert abs(idx.train_x.mean().item()) < 1e-4 and abs(idx.train_x.std().item() - 1) < 1e-3
    assert torch.equal(idx.test_y, data.test_y)


def test_idx_num_classes_is_largest_label_plus_one(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1], dtype=np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"] % 5)
    assert _load(name="idx", root=tmp_path).num_classes == 5
    assert _load(name="idx", root=tmp_path, num_classes=7).num_classes == 7
    _fails(
        r"train-labels-idx1-ubyte: label 4 \(sample 4\) out of range for 3 classes",
        name="idx",
        root=tmp_path,
        num_classes=3,
    )


# -------------------------------------------------------------------------------------------- CIFAR


def write_batch(path: Path, n: int, label_key: bytes, classes: int, seed: int, protocol: int = 2) -> dict[bytes, Any]:
    """A python batch as the original files hold it: bytes keys, uint8 N x 3072 data, a list of ints."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"batch " + path.name.encode(),
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_any_batch_sizes_and_subset(tmp_path: Path, protocol: int) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    sizes = {"data_batch_1": 7, "data_batch_2": 5, "data_batch_4": 3, "data_batch_10": 2, "test_batch": 4}
    batches = {
        name: write_batch(directory / name, n, b"labels", 10, i, protocol) for i, (name, n) in enumerate(sizes.items())
    }
    data = _load(name="cifar10", root=tmp_path)
    assert data.train_x.shape == (17, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    order = ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_10"]
    assert data.train_y.tolist() == [label for name in order for label in batches[name][b"labels"]]
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    raw = batches["data_batch_2"][b"data"].reshape(5, 3, 32, 32)[:, 2] / 255.0
    np.testing.assert_allclose(data.train_x[7:12, 2].numpy(), (raw - 0.4465) / 0.2616, rtol=1e-5, atol=1e-5)


def test_cifar10_numpy_1_pickles(tmp_path: Path) -> None:
    """Files written by numpy 1.x (as the original CIFAR files) name numpy.core.multiarray."""
    for name, n in (("data_batch_1", 3), ("test_batch", 2)):
        batch = write_batch(tmp_path / name, n, b"labels", 10, n)
        raw = (tmp_path / name).read_bytes()
        assert b"numpy._core.multiarray\n_reconstruct" in raw
        (tmp_path / name).write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    data = _load(name="cifar10", root=tmp_path)
    assert data.train_y.tolist() == write_batch(tmp_path / "x", 3, b"labels", 10, 3)[b"labels"]
    assert data.test_y.tolist() == batch[b"labels"] and data.train_x.shape == (3, 3, 32, 32)


def test_cifar100_fine_labels_and_own_statistics(tmp_path: Path) -> None:
    train = write_batch(tmp_path / "train", 30, b"fine_labels", 100, 0)
    write_batch(tmp_path / "test", 6, b"fine_labels", 100, 1)
    data = _load(name="cifar100", root=tmp_path)
    assert data.train_x.shape == (30, 3, 32, 32) and data.test_x.shape == (6, 3, 32, 32)
    assert data.num_classes == 100 and data.train_y.tolist() == train[b"fine_labels"]
    per_channel = data.train_x.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- npz


def write_npz(root: Path, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", **train)
    np.savez(root / "test.npz", **test)


def test_npz_gray_uint8_and_colour_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gray = {"x": rng.integers(0, 256, (20, 9, 7), dtype=np.uint8), "y": np.arange(20) % 4}
    write_npz(tmp_path / "gray", gray, {"x": gray["x"][:5], "y": gray["y"][:5]})
    data = _load(name="npz", root=tmp_path / "gray")
    assert data.train_x.shape == (20, 1, 9, 7) and data.test_x.shape == (5, 1, 9, 7) and data.num_classes == 4
    expected = gray["x"] / 255.0
    np.testing.assert_allclose(data.train_x[:, 0].numpy(), (expected - expected.mean()) / expected.std(), atol=1e-4)
    colour = {"x": rng.normal(5, 2, (10, 2, 4, 4)).astype(np.float64), "y": np.array([0, 1, 2, 6] * 2 + [0, 0])}
    write_npz(tmp_path / "colour", colour, {"x": colour["x"][:3], "y": colour["y"][:3]})
    data = _load(name="npz", root=tmp_path / "colour")
    assert data.train_x.shape == (10, 2, 4, 4) and data.train_x.dtype == torch.float32 and data.num_classes == 7
    means = data.train_x.transpose(0, 1).flatten(1).mean(1)
    torch.testing.assert_close(means, torch.zeros(2), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- callable


@pytest.mark.parametrize("kind", ["tensors", "dict", "numpy", "datasets"])
def test_callable_returns_arrays_or_datasets(kind: str) -> None:
    data = _load(name=f"{FIXTURES}:make", options={"kind": kind, "n_train": 30, "classes": 4})
    source = user_data_fixtures.arrays(n_train=30, classes=4)
    assert data.train_x.shape == (30, 1, 6, 5) and data.test_x.shape == (10, 1, 6, 5)
    assert data.num_classes == 4 and data.input_shape == (1, 6, 5)
    assert torch.equal(data.train_y, source["train_y"]) and torch.equal(data.test_y, source["test_y"])
    mean, std = source["train_x"].mean(), source["train_x"].std(unbiased=False)
    torch.testing.assert_close(data.test_x, (source["test_x"] - mean) / std, atol=1e-5, rtol=1e-5)
    assert torch.equal(source["train_x"], user_data_fixtures.arrays(n_train=30, classes=4)["train_x"])  # untouched


def test_train_limit_and_cache_key(big_idx: dict[bool, tuple[Path, dict[str, Any]]]) -> None:
    root, _ = big_idx[True]
    full = _load(name="mnist", root=root)
    small = _load(name="mnist", root=root, train_limit=500)
    assert small.train_size == 500 and small.test_x.shape[0] == 1000
    assert torch.equal(small.train_x, full.train_x[:500]) and torch.equal(small.train_y, full.train_y[:500])
    assert load_dataset(DataSpec(name="mnist", root=root, train_limit=500), seed=9) is small  # seed-independent
    assert _load(name="mnist", root=root) is full and _load(name="mnist", root=root, num_classes=12) is not full
    synthetic = load_dataset(DataSpec(name="synthetic", synthetic_size=64, train_limit=20), seed=3)
    assert synthetic.train_size == 20 and synthetic.test_x.shape[0] == 16
    a = _load(name=f"{FIXTURES}:make", options={"n_train": 30})
    assert _load(name=f"{FIXTURES}:make", options={"n_train": 31}).train_size == 31 and a.train_size == 30
    _fails(
        rf"^data\.train_limit: 4001 is larger than the training set \(4000 samples in {root}",
        name="mnist",
        root=root,
        train_limit=4001,
    )
    _fails(
        r"^data\.train_limit: 65 is larger than the training set \(64",
        name="synthetic",
        synthetic_size=64,
        train_limit=65,
    )


# ------------------------------------------------------------------------------------------ config


def test_config_names_options_and_roots() -> None:
    for name in ("mnist", "idx", "cifar10", "cifar100", "npz"):
        with pytest.raises(SpecError, match=rf"^config error: data\.root: dataset {name} needs a directory$"):
            resolve({"data": {"name": name}})
    with pytest.raises(SpecError, match=r"^config error: data\.name: must be one of .*package\.module:callable"):
        resolve({"data": {"name": "imagenet"}})
    with pytest.raises(SpecError, match=r"^config error: data\.options: dataset fashion-mnist takes no options"):
        resolve({"data": {"options": {"size": 3}}})
    spec = resolve({"data": {"name": f"{FIXTURES}:make", "options": {"n_train": 5}, "train_limit": 3}})
    assert spec.data.options == {"n_train": 5} and spec.data.train_limit == 3 and spec.data.num_classes is None
    with pytest.raises(SpecError, match=r"^config error: data\.train_limit: "):
        resolve({"data": {"train_limit": 0}})
    bypass = DataSpec.model_construct(name="mnist", root=Path("/nonexistent"), options={"a": 1})
    with pytest.raises(WorkloadError, match=r"^data\.options: dataset mnist takes no options \(got a\)"):
        load_dataset(bypass)


# ---------------------------------------------------------------------------------------- bad data


def test_missing_directories_and_files(tmp_path: Path) -> None:
    gone = tmp_path / "nope"
    for name in ("mnist", "idx", "cifar10", "cifar100", "npz"):
        _fails(rf"^data\.root: {re.escape(str(gone))}: no such directory \({name} needs", name=name, root=gone)
    write_mnist(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    _fails(r"^data\.root: .*/idx: missing t10k-labels-idx1-ubyte\[\.gz\]", name="idx", root=tmp_path / "idx")
    write_batch(tmp_path / "c10" / "data_batch_1", 3, b"labels", 10, 0)
    _fails(r"^data\.root: .*/c10: missing test_batch \(cifar10 needs", name="cifar10", root=tmp_path / "c10")
    write_batch(tmp_path / "c10b" / "test_batch", 3, b"labels", 10, 0)
    _fails(r"^data\.root: .*/c10b: missing data_batch_1 \(cifar10 needs", name="cifar10", root=tmp_path / "c10b")
    write_batch(tmp_path / "c100" / "test", 3, b"fine_labels", 100, 0)
    _fails(r"^data\.root: .*/c100/train: no such file", name="cifar100", root=tmp_path / "c100")
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "train.npz", x=np.zeros((3, 4, 4)), y=np.zeros(3, dtype=int))
    _fails(r"^data\.root: .*/npz: missing test\.npz \(npz needs", name="npz", root=tmp_path / "npz")
    np.savez(tmp_path / "npz" / "test.npz", x=np.zeros((3, 4, 4)), labels=np.zeros(3, dtype=int))
    _fails(r"^.*/npz/test\.npz: missing array 'y' \(has x, labels\)", name="npz", root=tmp_path / "npz")


def test_bad_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels, arrays["t10k-labels-idx1-ubyte"], magic=2051)
    _fails(rf"^{re.escape(str(labels))}: bad IDX magic 2051 \(expected 2049\)$", name="idx", root=tmp_path)
    write_idx(labels, arrays["t10k-labels-idx1-ubyte"])
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    _fails(rf"^{re.escape(str(images))}: truncated IDX file", name="mnist", root=tmp_path)
    images.write_bytes(images.read_bytes()[:9])
    _fails(rf"^{re.escape(str(images))}: truncated IDX header", name="mnist", root=tmp_path)
    images.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(gz, arrays["train-images-idx3-ubyte"])
    gz.write_bytes(gz.read_bytes()[:-100])
    _fails(rf"^{re.escape(str(gz))}: truncated or corrupt gzip file", name="mnist", root=tmp_path)
    write_idx(gz, arrays["train-images-idx3-ubyte"][:11])
    train_labels = re.escape(str(tmp_path / "train-labels-idx1-ubyte"))
    _fails(rf"^{train_labels}: 12 labels for 11 images in {re.escape(str(gz))}$", name="mnist", root=tmp_path)
    write_idx(gz, arrays["train-images-idx3-ubyte"])
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10))
    _fails(rf"^{train_labels}: label 10 \(sample 0\) out of range for 10 classes", name="mnist", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    write_idx(labels, np.zeros(0))
    _fails(r"^.*/t10k-images-idx3-ubyte: the test set is empty$", name="mnist", root=tmp_path)


def test_bad_npz_arrays(tmp_path: Path) -> None:
    x, y = np.zeros((6, 5, 5), dtype=np.uint8), np.arange(6) % 2
    cases: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]] = [
        ({"x": x, "y": y[:5]}, {"x": x, "y": y}, r"train\.npz: y: 5 labels for 6 images in .*train\.npz: x$"),
        ({"x": x.reshape(6, 25), "y": y}, {"x": x, "y": y}, r"train\.npz: x: images of shape \(6, 25\), expected"),
        ({"x": x, "y": y[:, None]}, {"x": x, "y": y}, r"train\.npz: y: labels of shape \(6, 1\), expected \(N,\)"),
        ({"x": x, "y": y - 1}, {"x": x, "y": y}, r"train\.npz: y: label -1 \(sample 0\) out of range for 2 classes"),
        ({"x": x, "y": y.astype(np.float32)}, {"x": x, "y": y}, r"train\.npz: y: labels of dtype float32, expected"),
        ({"x": x.astype(np.int64), "y": y}, {"x": x, "y": y}, r"train\.npz: x: images of dtype int64, expected uint8"),
        ({"x": x, "y": y}, {"x": x[:0], "y": y[:0]}, r"test\.npz: x: the test set is empty$"),
        ({"x": x, "y": y}, {"x": np.zeros((2, 4, 5), np.uint8), "y": y[:2]}, r"test\.npz: x: images are 1x4x5"),
    ]
    nan = x.astype(np.float32)
    nan[3, 1, 1] = np.nan
    cases.append(({"x": nan, "y": y}, {"x": x, "y": y}, r"train\.npz: x: non-finite values \(nan or inf\) in 1 image"))
    for i, (train, test, problem) in enumerate(cases):
        write_npz(tmp_path / str(i), train, test)
        _fails(rf"^{re.escape(str(tmp_path / str(i)))}/{problem}", name="npz", root=tmp_path / str(i))
    (tmp_path / "0" / "test.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _fails(r"/0/test\.npz: not a readable \.npz archive", name="npz", root=tmp_path / "0")
    write_npz(tmp_path / "obj", {"x": x, "y": y}, {"x": np.array([{"a": 1}], dtype=object), "y": y[:1]})
    _fails(r"/obj/test\.npz: not a readable \.npz archive \(ValueError", name="npz", root=tmp_path / "obj")


@pytest.mark.parametrize(
    ("fn", "options", "problem"),
    [
        ("with_nan", {}, r"train_x: non-finite values \(nan or inf\) in 1 image\(s\), the first is image 7$"),
        ("mismatched", {}, r"train_y: 39 labels for 40 images in data\.name: \S+: train_x$"),
        ("flat_images", {}, r"train_x: images of shape \(40, 30\), expected \(N, H, W\) or \(N, C, H, W\)$"),
        ("float_labels", {}, r"train_y: labels of dtype float32, expected integers$"),
        ("empty_test", {}, r"test_x: the test set is empty$"),
        ("three_things", {}, r": returned a tuple of 3, expected \(train_x, train_y, test_x, test_y\)"),
        ("bad_item", {}, r": train dataset: item 0 is a tuple, expected an \(input, label\) pair$"),
        ("broken", {}, r": raised RuntimeError: disk on fire second line$"),
        ("make", {"colour": 3}, r"raised TypeError: .*'colour' \(called with data\.options: colour\)$"),
        ("NOT_CALLABLE", {}, r": NOT_CALLABLE is not callable$"),
        ("absent", {}, r": tests\.user_data_fixtures has no attribute absent$"),
    ],
)
def test_bad_callable_data(fn: str, options: dict[str, Any], problem: str) -> None:
    _fails(rf"^data\.name: {FIXTURES}:{fn}.*{problem}", name=f"{FIXTURES}:{fn}", options=options)


def test_callable_import_error_and_labels_out_of_range() -> None:
    _fails(
        r"^data\.name: no_such_pkg_xyz\.data:make: cannot import no_such_pkg_xyz\.data",
        name="no_such_pkg_xyz.data:make",
    )
    _fails(
        rf"^data\.name: {FIXTURES}:make: train_y: label 2 \(sample 2\) out of range for 2 classes",
        name=f"{FIXTURES}:make",
        num_classes=2,
    )


# ------------------------------------------------------------------------------------ pickle safety


class _Evil:
    def __init__(self, call: Any, *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call, self.args


def test_malicious_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = {
        "system": (_Evil(os.system, f"touch {marker}"), r"refusing to unpickle (posix|os)\.system"),
        "eval": (_Evil(eval, f"open({str(marker)!r}, 'w')"), r"refusing to unpickle (__builtin__|builtins)\.eval"),
        "codec": (_Evil(codecs.encode, "abc", "rot13"), r"refusing to unpickle _codecs\.encode with 'rot13'"),
        "getattr": (
            _Evil(getattr, _Evil(__import__, "os"), "system"),
            r"refusing to unpickle (__builtin__|builtins)\.getattr",
        ),
    }
    for name, (payload, problem) in payloads.items():
        root = tmp_path / name
        write_batch(root / "data_batch_1", 3, b"labels", 10, 0)
        with (root / "test_batch").open("wb") as f:
            pickle.dump({b"data": payload, b"labels": [0, 1, 2]}, f, protocol=2)
        message = _fails(rf"^{re.escape(str(root / 'test_batch'))}: {problem}", name="cifar10", root=root)
        assert "only plain containers and numpy arrays" in message
        assert not marker.exists()
    (tmp_path / "system" / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    _fails(
        r"/system/test_batch: a list, expected a dict with b'data' and b'labels'$",
        name="cifar10",
        root=tmp_path / "system",
    )
    (tmp_path / "system" / "test_batch").write_bytes(b"\x80\x02}q\x00")
    _fails(r"/system/test_batch: not a readable pickle \(", name="cifar10", root=tmp_path / "system")


def test_bad_cifar_batches(tmp_path: Path) -> None:
    batch = write_batch(tmp_path / "data_batch_1", 4, b"labels", 10, 0)
    write_batch(tmp_path / "test_batch", 2, b"labels", 10, 1)
    path = re.escape(str(tmp_path / "data_batch_1"))
    for change, problem in [
        ({b"labels": [1, 2, 3]}, r" 3 labels for 4 images$"),
        ({b"labels": [1, 2, 3, 10]}, r" b'labels': label 10 \(sample 3\) out of range for 10 classes"),
        ({b"data": batch[b"data"][:, :100]}, r" b'data' of shape \(4, 100\), expected \(N, 3072\)$"),
        ({b"data": batch[b"data"].astype(np.int64) + 200}, r" b'data' of dtype int64, expected uint8 pixel values$"),
    ]:
        with (tmp_path / "data_batch_1").open("wb") as f:
            pickle.dump({**batch, **change}, f, protocol=2)
        _fails(rf"^{path}:{problem}", name="cifar10", root=tmp_path)
    del batch[b"labels"]
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    _fails(
        rf"^{path}: missing key b'labels' \(has b'batch_label', b'data', b'filenames'\)$", name="cifar10", root=tmp_path
    )


# ------------------------------------------------------------------------------------ through the CLI


def _parle(tmp_path: Path, root: Path, run: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "job.yaml"
    job = {
        "name": "userdata",
        "preset": "sgd",
        "replicas": 1,
        "model": {"name": "lenet"},
        "data": {"name": "mnist", "root": str(root), "batch_size": 64},
        "eval": {"train_subset": 500},
    }
    config.write_text(yaml.safe_dump(job))
    parle = Path(sys.executable).parent / "parle"
    cmd = [str(parle), "train", str(config), "--run-dir", str(run), "--set", "epochs=1", "--set", "max_rounds=2", "-q"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_trains_on_an_idx_directory(big_idx: dict[bool, tuple[Path, dict[str, Any]]], tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _parle(tmp_path, big_idx[True][0], run)
    assert result.returncode == 0, result.stderr
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_bad_data_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_mnist(root, 40, 10)
    labels = root / "train-labels-idx1-ubyte"
    write_idx(labels, np.arange(39) % 10)
    run = tmp_path / "run"
    result = _parle(tmp_path, root, run)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"parle: config error: {re.escape(str(labels))}: 39 labels for 40 images in .*train-images-idx3-ubyte",
        lines[0],
    ), result.stderr
    assert not run.exists()


@pytest.mark.parametrize("source", ["npz", "callable"])
def test_jobs_train_on_npz_and_callable_data_sets(tmp_path: Path, source: str) -> None:
    """Through the local runtime: the schedule is sized by the data set's own size (300 samples)."""
    from cluster.local import preflight, run_local
    from protos.spec import resolve

    rng = np.random.default_rng(7)
    if source == "npz":
        train = {"x": rng.integers(0, 256, (300, 6, 5), dtype=np.uint8), "y": np.arange(300) % 4}
        write_npz(tmp_path / "data", train, {"x": train["x"][:40], "y": train["y"][:40]})
        data: dict[str, Any] = {"name": "npz", "root": str(tmp_path / "data")}
    else:
        data = {"name": f"{FIXTURES}:make", "options": {"kind": "datasets", "n_train": 300, "classes": 4}}
    spec = resolve(
        {
            "preset": "parle",
            "replicas": 2,
            "epochs": 1,
            "model": {"name": "toy_models:mlp"},
            "data": {**data, "batch_size": 30},
            "optim": {"L": 2},
        }
    )
    size = preflight(spec)
    assert size == 300
    result = run_local(spec, tmp_path / "run", train_size=size)
    assert result.state.value == "succeeded", result.message or result.errors
    assert result.rounds == 5  # 300 / 30 = 10 batches per data pass, L = 2
