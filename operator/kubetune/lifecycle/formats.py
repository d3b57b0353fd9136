"""How the status writes times and messages: RFC 3339 timestamps (whole seconds, UTC) and clipped text. Pure."""

from __future__ import annotations

import datetime as dt

from kubetune.api.spec import MESSAGE_MAX_CHARS


def now_rfc3339(now: float) -> str:
    return dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str | None) -> float | None:
    """Kubernetes timestamps (``2026-11-23T16:06:00Z``, optionally with fractional seconds) → epoch."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    if "." in text:  # Python < 3.11 cannot parse nanoseconds: keep microseconds.
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def clip(text: str | None, limit: int = MESSAGE_MAX_CHARS) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"
