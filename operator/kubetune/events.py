"""The trainer's structured-event contract: one JSON object per stdout line, after a fixed marker.

    KUBETUNE_EVENT {"v": 1, "type": "progress", "time": 1732377600.5, "epoch": 1, ...}

Human log lines are printed beside them and never start with the marker. The operator (log follower) and
local mode read the same lines with :func:`parse_line`, which never raises: garbage, partial JSON, unknown
types and over-long lines are returned as ``None`` (and kept as plain log text by the reader).

Event types and their fields (all optional unless said):

- ``started``: run (str), model (str), epochs, total_steps, world_size, attempt, resumed_from_step
- ``progress``: epoch, epochs, step, total_steps, loss, lr, samples_per_second, eta_seconds
- ``metrics``: stage ("train"|"val"), epoch, step, train_loss, val_loss
- ``evaluation``: stage ("before"|"after"|"epoch"), epoch, metrics (dict name → float)
- ``checkpoint``: uri, step, epoch
- ``artifact``: uri, size, sha256 (of manifest.json), files (int)
- ``finished``: artifact_uri, duration_seconds
- ``failed``: reason (CamelCase), message, retryable (bool), exit_code
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MARKER = "KUBETUNE_EVENT "
SCHEMA_VERSION = 1
MAX_EVENT_LINE_CHARS = 64 * 1024
MAX_METRICS = 64

EventType = Literal["started", "progress", "metrics", "evaluation", "checkpoint", "artifact", "finished", "failed"]

# Trainer exit codes: the operator retries the retryable ones (from the latest checkpoint), fails fast on
# the permanent ones.
EXIT_OK = 0
EXIT_RETRYABLE = 75  # EX_TEMPFAIL: S3 unreachable, preemption, SIGTERM
EXIT_BAD_CONFIG = 78  # EX_CONFIG: the spec is invalid
EXIT_BAD_DATA = 65  # EX_DATAERR: a dataset row or file is broken
EXIT_FAILED = 1  # anything else (bug, OOM inside python): permanent
RETRYABLE_EXIT_CODES = frozenset({EXIT_RETRYABLE, 137, 143})  # 137/143: SIGKILL/SIGTERM (preemption, eviction)


class Event(BaseModel):
    """One structured trainer event. Extra fields are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")

    v: int = SCHEMA_VERSION
    type: EventType
    time: float = Field(default_factory=time.time)
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    stage: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    metrics: dict[str, float] | None = None
    uri: str | None = None
    size: int | None = None
    sha256: str | None = None
    reason: str | None = None
    message: str | None = None
    retryable: bool | None = None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def format_event(event_type: EventType, **fields: Any) -> str:
    """Render one event line (without newline). NaN/inf become null so every line is valid JSON."""
    event = Event(type=event_type, **fields)
    payload = _finite(event.model_dump(exclude_none=True))
    return MARKER + json.dumps(payload, separators=(",", ":"), sort_keys=True)


def parse_line(line: str) -> Event | None:
    """Parse one log line; ``None`` for human lines and anything malformed. Never raises."""
    if not line.startswith(MARKER) or len(line) > MAX_EVENT_LINE_CHARS:
        return None
    try:
        raw = json.loads(line[len(MARKER):])
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    metrics = raw.get("metrics")
    if isinstance(metrics, dict) and len(metrics) > MAX_METRICS:
        raw["metrics"] = dict(list(metrics.items())[:MAX_METRICS])
    try:
        return Event.model_validate(raw)
    except ValidationError:
        return None
