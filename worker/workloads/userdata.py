"""Users' own data: an ``npz`` directory, or a ``package.module:callable`` data set.

npz: ``train.npz`` and ``test.npz`` in ``data.root``, each with arrays ``x`` ((N,H,W) or (N,C,H,W), uint8 or
float) and ``y`` (N integer labels); read with ``allow_pickle=False``.

Callable: called with ``data.options`` as keyword arguments; returns a dict or tuple of four arrays or
tensors (train_x, train_y, test_x, test_y), or a pair of map-style datasets (train, test) whose items
are (input, label) pairs, materialised by indexing every item once.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.workloads.errors import WorkloadError, one_line
from worker.workloads.prepare import Chunk, Splits
from worker.workloads.user_code import resolve_callable

_KEYS = ("train_x", "train_y", "test_x", "test_y")
_NPZ_NEEDS = "npz needs train.npz and test.npz with arrays x and y"


# ---------------------------------------------------------------------------------------------- npz


def _read_npz(path: Path) -> Chunk:
    if not path.is_file():
        raise WorkloadError(f"data.root: {path.parent}: missing {path.name} ({_NPZ_NEEDS})")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise WorkloadError(f"{path}: a single array, expected an .npz archive with arrays x and y")
        with loaded as archive:
            for key in ("x", "y"):
                if key not in archive:
                    raise WorkloadError(f"{path}: missing array {key!r} (has {', '.join(archive) or 'none'})")
            x, y = archive["x"], archive["y"]
    except WorkloadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise WorkloadError(f"{path}: not a readable .npz archive ({type(err).__name__}: {one_line(err)})") from None
    return Chunk(x, y, f"{path}: x", f"{path}: y")


def load_npz(root: Path) -> Splits:
    if not root.is_dir():
        raise WorkloadError(f"data.root: {root}: no such directory ({_NPZ_NEEDS})")
    return Splits(train=[_read_npz(root / "train.npz")], test=[_read_npz(root / "test.npz")])


# ----------------------------------------------------------------------------------------- callable


def _as_array(value: object, where: str) -> np.ndarray:
    """A numpy view of a tensor (on CPU) or array-like; raises naming ``where``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()  # numpy has no bfloat16
        try:
            return value.numpy()
        except (TypeError, RuntimeError) as err:
            raise WorkloadError(f"{where}: tensor of dtype {value.dtype} ({one_line(err)})") from None
    try:
        array = np.asarray(value)
    except Exception as err:
        raise WorkloadError(f"{where}: not an array ({type(err).__name__}: {one_line(err)})") from None
    if array.dtype == object:
        raise WorkloadError(f"{where}: a {type(value).__name__} that is not a numeric array")
    return array


def _label(value: object, where: str) -> int:
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if array.size == 1 and array.dtype.kind in "iu":
            return int(array.reshape(()))
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise WorkloadError(f"{where}: label {one_line(repr(value))[:60]} is not an integer")


def _materialise(dataset: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, label) item of a map-style dataset, stacked: (N, ...) inputs and N int64 labels."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise WorkloadError(f"{where}: a {type(dataset).__name__}, expected a map-style Dataset (__len__, __getitem__)")
    try:
        n = len(dataset)
    except Exception as err:
        raise WorkloadError(f"{where}: len() raised {type(err).__name__}: {one_line(err)}") from None
    if n == 0:
        raise WorkloadError(f"{where}: the dataset is empty")
    x: np.ndarray | None = None
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as err:
            raise WorkloadError(f"{where}: item {i} raised {type(err).__name__}: {one_line(err)}") from None
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise WorkloadError(f"{where}: item {i} is a {type(item).__name__}, expected an (input, label) pair")
        image = _as_array(item[0], f"{where}: item {i}")
        if x is None:
            x = np.empty((n, *image.shape), dtype=image.dtype)
        elif image.shape != x.shape[1:]:
            raise WorkloadError(f"{where}: item {i} has shape {image.shape}, item 0 has {x.shape[1:]}")
        x[i] = image
        y[i] = _label(item[1], f"{where}: item {i}")
    assert x is not None
    return x, y


def load_callable(name: str, options: dict[str, Any]) -> Splits:
    """Call ``name`` (``package.module:callable``) with ``options`` and validate what it returns."""
    factory = resolve_callable(name, "data.name")
    try:
        result = factory(**options)
    except Exception as err:
        hint = f" (called with data.options: {', '.join(options) or 'none'})" if isinstance(err, TypeError) else ""
        raise WorkloadError(f"data.name: {name}: raised {type(err).__name__}: {one_line(err)}{hint}") from None
    prefix = f"data.name: {name}"
    expected = "expected (train_x, train_y, test_x, test_y) or (train_dataset, test_dataset)"
    if isinstance(result, Mapping):
        missing = [key for key in _KEYS if key not in result]
        if missing:
            raise WorkloadError(f"{prefix}: returned a dict without {', '.join(missing)} (needs {', '.join(_KEYS)})")
        values = [result[key] for key in _KEYS]
    elif isinstance(result, tuple | list) and len(result) in (2, 4):
        values = list(result)
    else:
        size = f" of {len(result)}" if isinstance(result, tuple | list) else ""
        raise WorkloadError(f"{prefix}: returned a {type(result).__name__}{size}, {expected}")
    if len(values) == 2:
        train_x, train_y = _materialise(values[0], f"{prefix}: train dataset")
        test_x, test_y = _materialise(values[1], f"{prefix}: test dataset")
        return Splits(
            train=[Chunk(train_x, train_y, f"{prefix}: train dataset", f"{prefix}: train dataset")],
            test=[Chunk(test_x, test_y, f"{prefix}: test dataset", f"{prefix}: test dataset")],
        )
    arrays = {key: _as_array(value, f"{prefix}: {key}") for key, value in zip(_KEYS, values, strict=True)}
    return Splits(
        train=[Chunk(arrays["train_x"], arrays["train_y"], f"{prefix}: train_x", f"{prefix}: train_y")],
        test=[Chunk(arrays["test_x"], arrays["test_y"], f"{prefix}: test_x", f"{prefix}: test_y")],
    )
