"""Checkpoints: safetensors for tensors plus a JSON manifest (round, schedules, spec, sha256).

Each checkpoint is a directory written under a temporary name, fsynced and renamed, so a crash
leaves either the whole checkpoint or none of it. On load, one whose checksum or manifest does not
verify is skipped (with a warning) and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
PREFIX = "ckpt-"


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, I/O error); the previous one is kept."""


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the next round to run: the reference closed round - 1
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    """Write a small text file by temp name + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def pack_job_state(model: Tensor, center: Tensor, replicas: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """One flat name space: ``reference`` (the model: what a user gets back), ``center`` (the coupling center
    the replicas are pulled toward) and ``replica{i}.{key}`` for each replica's saved state."""
    tensors = {"reference": model, "center": center}
    for replica, state in replicas.items():
        tensors.update({f"replica{replica}.{key}": value for key, value in state.items()})
    return tensors


def unpack_job_state(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[int, dict[str, Tensor]]]:
    """(model, center, replica states) of a checkpoint."""
    replicas: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("replica"):
            head, _, name = key.partition(".")
            replicas.setdefault(int(head.removeprefix("replica")), {})[name] = value
    return tensors["reference"], tensors.get("center", tensors["reference"]), replicas


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory (e.g. a model that is still the center itself):
    every later one that shares its storage with an earlier one is written from a copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def save(self, round: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Write the checkpoint of ``round``. A failed write (disk full, I/O error) removes its temporary
        files, keeps the previous checkpoints and raises ``CheckpointWriteError`` naming both."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{PREFIX}{round:09d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            contiguous = _unshared({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            save_file(contiguous, str(tmp / TENSORS))
            with (tmp / TENSORS).open("rb") as f:
                os.fsync(f.fileno())
            manifest = {
                "round": round,
                "created": time.time(),
                "sha256": _sha256(tmp / TENSORS),
                "tensors": sorted(contiguous),
                **meta,
            }
            write_atomic_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        except (OSError, SafetensorError) as err:
            # Disk full or an I/O error: nothing of this checkpoint may stay behind, the previous ones are
            # untouched (the new one only ever replaced them by a rename).
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self._candidates()
            previous = kept[-1].name if kept else "none yet"
            raise CheckpointWriteError(
                f"checkpoint of round {round} not written to {self.directory} ({one_line(err)}); "
                f"the previous checkpoint is kept ({previous})"
            ) from err
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(self.directory)
        self._prune()
        return final

    def _candidates(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(PREFIX) and p.is_dir())

    def _prune(self) -> None:
        for old in self._candidates()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, path: Path) -> Checkpoint:
        """Load one checkpoint, raising ValueError if anything about it does not check out."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: unreadable manifest ({err})") from None
        tensor_file = path / TENSORS
        if not tensor_file.is_file() or _sha256(tensor_file) != manifest.get("sha256"):
            raise ValueError(f"{path}: checksum mismatch or missing {TENSORS}")
        tensors = load_file(str(tensor_file))
        return Checkpoint(round=int(manifest["round"]), tensors=tensors, meta=manifest, path=path)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None."""
        for path in reversed(self._candidates()):
            try:
                return self.verify(path)
            except (ValueError, KeyError, OSError) as err:
                log.warning("skipping checkpoint %s: %s", path.name, err)
        return None
