"""A job's writes to its directory, done in order on one thread of the job's own, never under the job's lock.

Checkpoints, the per-round round state, the exported model and the final reference can each take a
while on a slow or full disk; heartbeats, joins and other jobs must not wait for them. The job hands
each write over as a closure (what to write is decided, and copied where it could still change, under
the job's lock) and goes on. The order of the hand-overs is the order on disk, which the restart logic
relies on: the round state of a round is written after that round's checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class DiskWriter:
    """Runs the writes handed to it one at a time, in order. A write that raises sets its future's
    exception (and is logged if nobody asked for the future); the writes after it still run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None  # started by the first write: a pending job holds none
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, write: Callable[[], T]) -> Future[T]:
        done: Future[T] = Future()
        with self._lock:
            if self._closed:
                done.set_exception(RuntimeError(f"{self.name}: closed, nothing more is written"))
                return done
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put((write, done))
        return done

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            write, done = item
            try:
                done.set_result(write())
            except BaseException as err:
                log.error("%s: a write failed: %s", self.name, err, exc_info=err)
                done.set_exception(err)

    def flush(self, timeout: float | None = None) -> None:
        """Return once every write handed over before this call is done (TimeoutError after ``timeout``)."""
        with self._lock:
            thread = self._thread if self._closed else None
        if thread is not None:  # closed: what was queued is being written, then the thread ends
            thread.join(timeout)
            return
        self.submit(lambda: None).result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop (later hand-overs fail at once). Never call it holding a lock
        that a queued write takes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: writes still running after %.0fs; leaving them", self.name, timeout)
