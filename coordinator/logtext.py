"""Client-provided text in the coordinator's log: capped in length and on one line.

Worker names, failure reasons from workers and messages that quote a request reach the log from
whoever can call the coordinator; uncapped, one call could write megabytes per line or forge log lines
with embedded newlines. ``capped`` is applied where such text is logged (the gRPC answer itself keeps
the full message: the caller wrote it)."""

from __future__ import annotations

MAX_LOGGED_CHARS = 300


def capped(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text`` with control characters escaped (no line breaks) and cut to ``limit`` characters, saying how
    many were cut."""
    raw = str(text)
    head = raw[:limit]
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(raw) > limit:
        safe += f"... ({len(raw) - limit} more characters)"
    return safe
