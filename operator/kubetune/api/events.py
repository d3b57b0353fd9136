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

The trainer also writes its final events (artifact, key ``after`` metrics, finished/failed) as the same lines
to the container's termination message (:func:`termination_message`, read with
:func:`parse_termination_message`), so the result does not depend on the log surviving.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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


def shown_uri(text: str) -> str:
    """A URI as events and status may show it: without its query string, where a presigned URL carries its
    credential. Text that is no URI is left as it is."""
    return text.split("?", 1)[0] if "://" in text else text


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


# ------------------------------------------------------------------------------------------ termination message
# The trainer's final summary, written to the container's terminationMessagePath on every exit: the result then
# survives in the pod's status (containerStatuses[].state.terminated.message) even when its log is gone.

#: Kubernetes keeps at most this many bytes of one container's termination message.
TERMINATION_MESSAGE_MAX_BYTES = 4096
#: The ``after`` evaluation metrics a termination message keeps, most important first (any ``*loss*`` metric
#: comes after these).
TERMINATION_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "image_to_text_R@1")
_MESSAGE_CUT = "..."


def _render(event: Event) -> str:
    """``event`` as one log line, exactly as :func:`format_event` writes it."""
    payload = _finite(event.model_dump(exclude_none=True))
    return MARKER + json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _key_metrics(metrics: dict[str, float] | None) -> list[str]:
    names = [k for k in TERMINATION_METRICS if k in (metrics or {})]
    return names + sorted(k for k in (metrics or {}) if "loss" in k and k not in names)


def termination_message(events: Sequence[Event], limit: int = TERMINATION_MESSAGE_MAX_BYTES) -> str:
    """The final summary of a run: its last ``artifact`` event, its last ``after`` evaluation (key metrics only,
    see :data:`TERMINATION_METRICS`) and its last ``finished`` or ``failed`` event, as event lines joined by
    ``"\\n"`` in the order they were emitted, at most ``limit`` bytes.

    To fit, it drops evaluation metrics (least important first), then the evaluation event, then cuts the
    ``failed`` message, then (only for absurd events) drops whole lines, oldest first: it never emits a partial
    line. An evaluation event without any key metric is left out. ``""`` when there is nothing to report.
    """
    def last(match: Callable[[Event], bool]) -> int | None:
        return next((i for i in range(len(events) - 1, -1, -1) if match(events[i])), None)

    slots = {
        "artifact": last(lambda e: e.type == "artifact"),
        "evaluation": last(lambda e: e.type == "evaluation" and e.stage == "after"),
        "end": last(lambda e: e.type in ("finished", "failed")),
    }
    chosen: dict[str, Event] = {slot: events[i] for slot, i in slots.items() if i is not None}
    order = sorted(chosen, key=lambda slot: slots[slot] or 0)
    evaluation = chosen.get("evaluation")
    keys = _key_metrics(evaluation.metrics) if evaluation is not None else []

    def text() -> str:
        lines = []
        for slot in order:
            event = chosen[slot]
            if slot == "evaluation":
                if not keys:
                    continue
                metrics = event.metrics or {}
                event = Event(type="evaluation", v=event.v, time=event.time, stage=event.stage, epoch=event.epoch,
                              metrics={k: metrics[k] for k in keys})
            lines.append(_render(event))
        return "\n".join(lines)

    def fits() -> bool:
        return len(text().encode()) <= limit

    while keys and not fits():
        keys.pop()
    end = chosen.get("end")
    if not fits() and end is not None and end.type == "failed" and end.message:
        message = end.message
        lo, hi = 0, len(message)
        while lo < hi:  # the longest prefix that fits
            mid = (lo + hi + 1) // 2
            chosen["end"] = end.model_copy(update={"message": message[:mid] + _MESSAGE_CUT})
            if fits():
                lo = mid
            else:
                hi = mid - 1
        chosen["end"] = end.model_copy(update={"message": message[:lo] + _MESSAGE_CUT})
    while order and not fits():
        order.pop(0)
    return text()


def parse_termination_message(text: str | None) -> list[Event]:
    """The events of a termination message (or of the log tail Kubernetes puts there instead); non-event lines
    are skipped. Never raises: anything unreadable gives ``[]``."""
    if not isinstance(text, str):
        return []
    try:
        return [e for e in (parse_line(line) for line in text.splitlines()) if e is not None]
    except Exception:
        return []
