"""Where a job's events and result tensors land: ``metrics.jsonl`` (one JSON object per line: rounds,
evals, checkpoints, state changes, membership) and safetensors files written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from coordinator.checkpoint import one_line

log = logging.getLogger(__name__)


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events of a metrics log (a torn last line from a crash is ignored)."""
    events: list[dict[str, Any]] = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class MetricsLog:
    """Append-only JSON lines. On resume, events from rounds at or after the checkpoint's round are
    dropped first, so the log reads like one uninterrupted run."""

    def __init__(self, path: Path, keep_below_round: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_below_round > 0 and self.path.exists():
            kept = [e for e in read_events(self.path) if e.get("round", -1) < keep_below_round]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
            tmp.replace(self.path)
        elif keep_below_round == 0 and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("ab", buffering=0)
        self._size = self._file.seek(0, os.SEEK_END)
        self._failing = False

    def write(self, event: dict[str, Any]) -> None:
        """Append one event. When the disk is full the event is dropped (with a log line and a metric, once
        per failing streak) and any part of it written is cut off again: the job goes on, the log stays
        whole lines."""
        if self._file.closed:  # the job was closed (coordinator stopping, job released): nothing more to log
            return
        line = (json.dumps(event) + "\n").encode()
        try:
            written = 0
            while written < len(line):
                written += self._file.write(line[written:]) or 0
        except OSError as err:
            from coordinator import metrics  # the worker side writes no event logs: imported on need

            metrics.EVENT_LOG_FAILURES.inc()
            if not self._failing:
                log.error("%s: cannot append events (%s); dropping them until it can", self.path, err)
            self._failing = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._size)
            return
        if self._failing:
            log.info("%s: appending events again", self.path)
        self._failing = False
        self._size += len(line)

    def close(self) -> None:
        self._file.close()


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors via a temporary name and rename: readers never see half a file. OSError naming the file
    when it cannot be written (e.g. a full disk); nothing of it is left then."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)  # e.g. the disk is full: leave no half file behind
        raise OSError(f"{path.name} not written ({one_line(err)})") from err
