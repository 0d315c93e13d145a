"""The job registry: one SQLite database (WAL) in the coordinator's state directory.

It records what was submitted and where each job stands, so a restarted coordinator knows which jobs
to resume (from their last good checkpoint) and which are over (kept for their results).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    round INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    directory TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    spec_json: str
    state: str
    message: str
    round: int
    created: float
    updated: float
    directory: str  # the job's run directory: config, metrics, checkpoints, results


def registry_token(record: JobRecord) -> str:
    """Where a page of ``Registry.page`` ends: the next page starts after this job."""
    return f"{record.created!r}|{record.id}"


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created DESC, id DESC)")

    def add(self, job_id: str, name: str, spec_json: str, state: str, directory: Path) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, name, spec_json, state, created, updated, directory)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, spec_json, state, now, now, str(directory)),
            )

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def update(
        self, job_id: str, *, state: str | None = None, message: str | None = None, round: int | None = None
    ) -> None:
        sets: list[str] = ["updated = ?"]
        values: list[object] = [time.time()]
        for column, value in (("state", state), ("message", message), ("round", round)):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*values, job_id))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC, id DESC").fetchall()
        return [JobRecord(*row) for row in rows]

    def page(self, states: list[str], after: str | None, limit: int) -> list[JobRecord]:
        """At most ``limit`` jobs, newest first, in ``states`` (all if empty), after the job that
        ``after`` (a ``registry_token``) names; ValueError for a token that is not one."""
        where: list[str] = []
        values: list[object] = []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            values.extend(states)
        if after is not None:
            created, sep, job_id = after.partition("|")
            if not sep:
                raise ValueError(f"bad page token {after!r}")
            where.append("(created < ? OR (created = ? AND id < ?))")
            values.extend([float(created), float(created), job_id])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        query = f"SELECT * FROM jobs {clause} ORDER BY created DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*values, limit)).fetchall()
        return [JobRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
