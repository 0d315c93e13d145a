"""Test-session settings that must exist before any test module imports ray."""

from __future__ import annotations

import os

# Ray reads these when it is imported: bind the test cluster to loopback only and run it without
# token auth (it only ever listens on 127.0.0.1 and lives for one test module).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
