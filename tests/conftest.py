"""Test-session settings that must exist before any test module imports ray."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray reads these when it is imported: bind the test cluster to loopback only and run it without
# token auth (it only ever listens on 127.0.0.1 and lives for one test module).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ----- worker processes ----------------------------------------------------------------------------

TESTS = Path(__file__).parent


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Worker processes import the test models too."""
    path = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; reaped (TERM, then KILL) when it ends, whatever happened."""
    from cluster.processes import reap  # after the Ray settings above

    started: list[subprocess.Popen[bytes]] = []
    yield started
    reap(started, grace_s=5)
