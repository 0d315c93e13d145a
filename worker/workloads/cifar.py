"""CIFAR-10 and CIFAR-100 in their python formats, read with a restricted unpickler.

CIFAR-10: ``data_batch_<k>`` (any of them, in numeric order) and ``test_batch``, dicts with ``data`` (N x
3072 uint8, channel-major 32x32) and ``labels``. CIFAR-100: ``train`` and ``test`` with ``data`` and
``fine_labels``. Either directly in ``data.root`` or in its ``cifar-10-batches-py`` / ``cifar-100-python``
subdirectory. Keys are bytes, as in the original files (Python 2 pickles read with ``encoding='bytes'``).
"""

from __future__ import annotations

import builtins
import importlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from worker.workloads.errors import WorkloadError, one_line
from worker.workloads.prepare import Chunk, Splits

_IMAGE = (3, 32, 32)
_SUBDIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_BATCH = re.compile(r"data_batch_(\d+)")


class _Refused(Exception):
    pass


def _latin1_encode(text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') under pickle protocols 0-2.
    # No codec lookup for the file's encoding name: compare it as a string.
    latin1 = str(encoding).lower().replace("-", "").replace("_", "") in ("latin1", "iso88591", "l1")
    if not isinstance(text, str) or not latin1 or errors != "strict":
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin-1")


def _numpy_global(module: str, name: str) -> Any:
    # numpy >= 2 keeps these in numpy._core (numpy.core is a deprecated alias); 1.x in numpy.core.
    for package in ("numpy._core", "numpy.core"):
        try:
            found = getattr(importlib.import_module(f"{package}.{module}"), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def _allowed() -> dict[tuple[str, str], Any]:
    plain = {name: getattr(builtins, name) for name in ("dict", "list", "tuple", "str", "bytes", "bytearray", "int")}
    plain |= {"float": float, "bool": bool}
    table: dict[tuple[str, str], Any] = {}
    for module in ("builtins", "__builtin__"):
        table |= {(module, name): obj for name, obj in plain.items()}
    table[("_codecs", "encode")] = _latin1_encode
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for module, name in [("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")]:
        found = _numpy_global(module, name)
        if found is not None:
            for package in ("numpy.core", "numpy._core"):
                table[(f"{package}.{module}", name)] = found
    return table


_ALLOWED = _allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays only: any other global is refused before it is looked up,
    so a crafted file cannot import or call anything."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def restricted_load(path: Path) -> object:
    """Unpickle ``path`` with bytes semantics (``encoding='bytes'``), admitting only builtins containers and
    numpy arrays. Raises ``WorkloadError`` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WorkloadError(f"{path}: cannot read ({one_line(err)})") from err
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as err:
        raise WorkloadError(
            f"{path}: refusing to unpickle {err} (a CIFAR batch may hold only plain containers and numpy arrays)"
        ) from None
    except Exception as err:
        raise WorkloadError(f"{path}: not a readable pickle ({type(err).__name__}: {one_line(err)})") from None


def _get(batch: dict[Any, Any], key: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    return None


def read_batch(path: Path, label_key: str) -> Chunk:
    """One python batch as (N,3,32,32) uint8 images and N labels."""
    if not path.is_file():
        raise WorkloadError(f"data.root: {path}: no such file (a CIFAR python batch)")
    batch = restricted_load(path)
    if not isinstance(batch, dict):
        raise WorkloadError(f"{path}: a {type(batch).__name__}, expected a dict with b'data' and b'{label_key}'")
    data, labels = _get(batch, "data"), _get(batch, label_key)
    for key, value in (("data", data), (label_key, labels)):
        if value is None:
            keys = ", ".join(sorted(repr(k) for k in batch))
            raise WorkloadError(f"{path}: missing key b'{key}' (has {keys})")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except Exception as err:
        raise WorkloadError(f"{path}: b'data' or b'{label_key}' is not an array ({one_line(err)})") from None
    if data.ndim != 2 or data.shape[1] != np.prod(_IMAGE):
        raise WorkloadError(f"{path}: b'data' of shape {data.shape}, expected (N, 3072)")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise WorkloadError(f"{path}: b'data' of dtype {data.dtype}, expected uint8 pixel values")
        data = data.astype(np.uint8)
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise WorkloadError(f"{path}: b'{label_key}' of shape {labels.shape} and dtype {labels.dtype}, expected N ints")
    if len(labels) != len(data):
        raise WorkloadError(f"{path}: {len(labels)} labels for {len(data)} images")
    return Chunk(data.reshape(-1, *_IMAGE), labels, str(path), f"{path}: b'{label_key}'")


def _directory(root: Path, name: str, test_file: str, needs: str) -> Path:
    if not root.is_dir():
        raise WorkloadError(f"data.root: {root}: no such directory ({name} needs {needs})")
    for directory in (root, root / _SUBDIRS[name]):
        if (directory / test_file).is_file():
            return directory
    raise WorkloadError(f"data.root: {root}: missing {test_file} ({name} needs {needs})")


def load_cifar10(root: Path) -> Splits:
    needs = "data_batch_1..5 (any of them) and test_batch"
    directory = _directory(root, "cifar10", "test_batch", needs)
    numbered = sorted(
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _BATCH.fullmatch(path.name)) and path.is_file()
    )
    if not numbered:
        raise WorkloadError(f"data.root: {directory}: missing data_batch_1 (cifar10 needs {needs})")
    train = [read_batch(path, "labels") for _, path in numbered]
    return Splits(train=train, test=[read_batch(directory / "test_batch", "labels")])


def load_cifar100(root: Path) -> Splits:
    directory = _directory(root, "cifar100", "test", "train and test")
    return Splits(
        train=[read_batch(directory / "train", "fine_labels")],
        test=[read_batch(directory / "test", "fine_labels")],
    )
