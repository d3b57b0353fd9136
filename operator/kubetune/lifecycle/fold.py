"""The log → status fold: trainer log lines and events → bounded, coalesced status patches. Pure.

The operator's log follower feeds each log line to a :class:`StatusFolder`, takes a coalesced patch with
:meth:`StatusFolder.take_patch` when its :class:`Throttle` says so, and remembers how far it read with a
:class:`LogCursor`. What the run does next is not decided here (see :mod:`kubetune.lifecycle`).

Bounds (so that a run never makes its object large): at most ``LOG_TAIL_LINES`` lines of at most
``LOG_LINE_MAX_CHARS`` characters, at most ``MAX_METRICS`` evaluation metrics per stage, messages cut at
``MESSAGE_MAX_CHARS``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from kubetune.api.events import Event, parse_line, shown_uri
from kubetune.api.spec import LOG_LINE_MAX_CHARS, LOG_TAIL_LINES, MAX_METRICS
from kubetune.lifecycle.formats import clip, parse_rfc3339


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric_dict(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _finite(value)
        if number is not None and len(out) < MAX_METRICS:
            out[str(key)[:100]] = number
    return out


EPOCH_METRICS = ("R@1", "R@5", "R@10", "reciprocal_rank", "ndcg_at_k", "image_to_text_R@1")
MAX_EPOCH_POINTS = 1000
MAX_FRONTIER_POINTS = 22


def _wise_ft_summary(event: Event) -> dict[str, Any]:
    """status.metrics.wiseFt from the trainer's wise_ft evaluation event (its frontier bounded, numbers finite)."""
    extra = event.model_extra or {}
    frontier = []
    for point in extra.get("frontier") or []:
        if isinstance(point, Mapping):
            frontier.append({k: v for k in ("alpha", "target", "reference", "zero_shot")
                             if (v := _finite(point.get(k))) is not None})
    summary: dict[str, Any] = {"frontier": frontier[:MAX_FRONTIER_POINTS]}
    for key, field in (("alpha", "alpha"), ("keepReference", "keep_reference")):
        value = _finite(extra.get(field))
        if value is not None:
            summary[key] = value
    if isinstance(extra.get("metric"), str):
        summary["metric"] = clip(extra["metric"], 100)
    return summary


# ------------------------------------------------------------------------------------------- progress
def percent_done(step: int | None, total_steps: int | None, epoch: int | None, epochs: int | None) -> float | None:
    if step is not None and total_steps:
        return round(min(100.0, max(0.0, 100.0 * step / total_steps)), 1)
    if epoch is not None and epochs:
        return round(min(100.0, max(0.0, 100.0 * (epoch - 1) / epochs)), 1)
    return None


def summary(progress: Mapping[str, Any]) -> str | None:
    parts = []
    if progress.get("epoch") is not None and progress.get("epochs"):
        parts.append(f"{progress['epoch']}/{progress['epochs']}")
    if progress.get("percent") is not None:
        parts.append(f"{progress['percent']:.0f}%")
    return " ".join(parts)[:64] or None


@dataclasses.dataclass
class _Rate:
    """Step rate within one attempt, for an ETA when the trainer does not send one."""

    t0: float | None = None
    step0: int | None = None

    def eta(self, t: float, step: int | None, total: int | None) -> float | None:
        if step is None or not total:
            return None
        if self.t0 is None or self.step0 is None or step < self.step0:
            self.t0, self.step0 = t, step
            return None
        done = step - self.step0
        elapsed = t - self.t0
        if done <= 0 or elapsed <= 0:
            return None
        return round(max(0.0, (total - step) * elapsed / done), 1)


# ------------------------------------------------------------------------------------------- folding
class StatusFolder:
    """Folds trainer log lines into status fields and hands out coalesced patches.

    ``status`` is the run's current status (camelCase dict, as stored); the folder keeps its own copy of the
    fields it owns and remembers which top-level fields changed since the last :meth:`take_patch`.
    """

    def __init__(self, status: Mapping[str, Any] | None = None, *, tail_lines: int = LOG_TAIL_LINES,
                 line_max_chars: int = LOG_LINE_MAX_CHARS) -> None:
        status = copy.deepcopy(dict(status or {}))
        self.status: dict[str, Any] = status
        self.sent: dict[str, Any] = copy.deepcopy(status)  # what the server holds (for merge-patch removals)
        self._before_patch: dict[str, Any] = {}
        self.tail: deque[str] = deque((str(x)[:line_max_chars] for x in status.get("logTail") or ()),
                                      maxlen=tail_lines)
        self.line_max_chars = line_max_chars
        self.dirty: set[str] = set()
        self.pending_times: list[float] = []  # when the lines in the next patch were written (for lag)
        self.last_failed: Event | None = None
        self.started = False
        self.finished = False
        self._rate = _Rate()

    # -- input
    def feed_line(self, line: str, written_at: float | None = None) -> Event | None:
        """Fold one log line (without newline); returns the event if it was one."""
        line = line.rstrip("\r\n")
        event = parse_line(line)
        if event is None:
            if line.strip():
                self.tail.append(clip(line, self.line_max_chars) or "")
                self.dirty.add("logTail")
                self._pending(written_at)
            return None
        self.fold_event(event, written_at if written_at is not None else event.time)
        self._pending(written_at if written_at is not None else event.time)
        return event

    def _pending(self, written_at: float | None) -> None:
        if written_at is not None and len(self.pending_times) < 10_000:
            self.pending_times.append(written_at)

    def fold_event(self, event: Event, t: float) -> None:
        kind = event.type
        if kind == "started":
            self.started = True
            progress = dict(self.status.get("progress") or {})
            for src, dst in (("epochs", "epochs"), ("total_steps", "totalSteps")):
                value = getattr(event, src)
                if value is not None:
                    progress[dst] = value
            extra = event.model_extra or {}
            resumed = extra.get("resumed_from_step")
            if isinstance(resumed, int) and resumed >= 0:
                progress["step"] = resumed
            self._rate = _Rate()
            self._set_progress(progress)
            self._set_started_from(extra)
        elif kind == "progress":
            progress = dict(self.status.get("progress") or {})
            for src, dst in (("epoch", "epoch"), ("epochs", "epochs"), ("step", "step"),
                             ("total_steps", "totalSteps")):
                value = getattr(event, src)
                if isinstance(value, int) and value >= 0:
                    progress[dst] = value
            sps = _finite(event.samples_per_second)
            if sps is not None and sps >= 0:
                progress["samplesPerSecond"] = round(sps, 3)
            skipped = (event.model_extra or {}).get("skipped_rows")
            if isinstance(skipped, int) and not isinstance(skipped, bool) and skipped >= 0:
                progress["skippedRows"] = skipped
            eta = _finite(event.eta_seconds)
            if eta is None:
                eta = self._rate.eta(t, progress.get("step"), progress.get("totalSteps"))
            else:
                self._rate.eta(t, progress.get("step"), progress.get("totalSteps"))
            if eta is not None and eta >= 0:
                progress["etaSeconds"] = round(eta, 1)
            self._set_progress(progress)
            loss = _finite(event.loss)
            if loss is not None:
                self._set_metric("trainLoss", loss)
        elif kind == "metrics":
            for src, dst in (("train_loss", "trainLoss"), ("val_loss", "valLoss")):
                value = _finite(getattr(event, src))
                if value is not None:
                    self._set_metric(dst, value)
        elif kind == "evaluation":
            metrics = dict(self.status.get("metrics") or {})
            if event.stage in {"before", "after"}:
                metrics[event.stage] = _metric_dict(event.metrics)
            elif event.stage == "epoch" and isinstance(event.epoch, int):
                values = _metric_dict(event.metrics)
                point = {"epoch": float(event.epoch), **{k: values[k] for k in EPOCH_METRICS if k in values}}
                kept = [p for p in metrics.get("epochs") or [] if p.get("epoch") != point["epoch"]]
                metrics["epochs"] = [*kept, point][-MAX_EPOCH_POINTS:]
            elif event.stage == "wise_ft":
                metrics["wiseFt"] = _wise_ft_summary(event)
            else:
                return
            self.status["metrics"] = metrics
            self.dirty.add("metrics")
        elif kind == "checkpoint":
            if event.uri:
                self.status["checkpoint"] = clip(event.uri, 2048)
                self.dirty.add("checkpoint")
        elif kind == "artifact":
            if event.uri:
                artifact: dict[str, Any] = {"uri": clip(event.uri, 2048)}
                if isinstance(event.size, int) and event.size >= 0:
                    artifact["size"] = event.size
                if event.sha256 and len(event.sha256) <= 64:
                    artifact["sha256"] = event.sha256
                self.status["artifact"] = artifact
                self.dirty.add("artifact")
        elif kind == "finished":
            self.finished = True
            progress = dict(self.status.get("progress") or {})
            progress["percent"] = 100.0
            progress["etaSeconds"] = 0.0
            if progress.get("totalSteps"):
                progress["step"] = progress["totalSteps"]
            self._set_progress(progress)
        elif kind == "failed":
            self.last_failed = event

    def _set_progress(self, progress: dict[str, Any]) -> None:
        if progress.get("percent") != 100.0 or not self.finished:
            pct = percent_done(progress.get("step"), progress.get("totalSteps"), progress.get("epoch"),
                               progress.get("epochs"))
            if pct is not None:
                progress["percent"] = pct
        progress["summary"] = summary(progress)
        progress = {k: v for k, v in progress.items() if v is not None}
        if progress != self.status.get("progress"):
            self.status["progress"] = progress
            self.dirty.add("progress")

    def _set_started_from(self, extra: Mapping[str, Any]) -> None:
        model = extra.get("model")
        if not isinstance(model, str) or not model:
            return
        started: dict[str, Any] = {"model": clip(model, 253)}
        for key, field, limit in (("pretrained", "pretrained", 253), ("source", "weights_from", 2048)):
            value = extra.get(field)
            if isinstance(value, str) and value:
                started[key] = clip(shown_uri(value), limit)
        if started != self.status.get("startedFrom"):
            self.status["startedFrom"] = started
            self.dirty.add("startedFrom")

    def _set_metric(self, key: str, value: float) -> None:
        metrics = dict(self.status.get("metrics") or {})
        if metrics.get(key) != value:
            metrics[key] = value
            self.status["metrics"] = metrics
            self.dirty.add("metrics")

    def update(self, patch: Mapping[str, Any]) -> None:
        """Record an operator-side change (phase, conditions, ...) so that it goes out with the next patch."""
        for key, value in patch.items():
            self.status[key] = copy.deepcopy(value)
            self.dirty.add(key)

    # -- output
    @property
    def has_pending(self) -> bool:
        return bool(self.dirty)

    def take_patch(self) -> tuple[dict[str, Any], list[float]]:
        """The status fields changed since the last call (top-level merge patch), and the write times of the
        lines it covers. Clears the pending state."""
        self.status["logTail"] = list(self.tail)
        patch = {key: merge_diff(self.sent.get(key), self.status.get(key)) for key in sorted(self.dirty)}
        self._before_patch = {key: self.sent.get(key) for key in self.dirty}
        for key in self.dirty:
            self.sent[key] = copy.deepcopy(self.status.get(key))
        times = self.pending_times
        self.dirty = set()
        self.pending_times = []
        return patch, times

    def requeue(self, patch: Mapping[str, Any], times: list[float]) -> None:
        """The last patch did not reach the server: send its fields again (with their current values)."""
        for key in patch:
            self.sent[key] = self._before_patch.get(key, self.sent.get(key))
            self.dirty.add(key)
        self.pending_times.extend(times)


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) value that turns ``old`` into ``new``: nested objects merge on the server,
    so keys that disappeared must be sent as null (e.g. a later evaluation with other metric names must replace
    the earlier one, not add to it beyond the schema's maxProperties)."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return copy.deepcopy(new)
    out: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        out[key] = merge_diff(old.get(key), value)
    return out


class Throttle:
    """At most one flush per ``interval`` seconds; urgent flushes (phase changes) go out at once."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -math.inf

    def due(self, now: float, *, urgent: bool = False) -> bool:
        return urgent or now - self.last >= self.interval

    def delay(self, now: float) -> float:
        """Seconds until the next non-urgent flush is allowed."""
        return max(0.0, self.last + self.interval - now)

    def flushed(self, now: float) -> None:
        self.last = now


# ------------------------------------------------------------------------------------------- log cursor
@dataclasses.dataclass
class LogCursor:
    """How far a followed log was read, so that a reconnect skips what was already folded.

    A reconnect asks for ``sinceTime`` (whole seconds), so the API server replays the lines of the last second
    read: lines older than the last timestamp are dropped, and of the lines carrying exactly that timestamp
    the ones already read."""

    last_ts: float | None = None
    seen_at_last: int = 0  # lines read that carry exactly last_ts
    _skip: int = 0
    last_stamp: str | None = None  # last_ts as the API server wrote it (nanoseconds), for the status

    @classmethod
    def from_status(cls, status: Mapping[str, Any], pod: str) -> LogCursor:
        """The cursor persisted in ``status.logCursor`` when it is for ``pod`` (else a fresh one): a restarted
        operator reads on from the last line folded into the status instead of replaying the whole log (a replay
        would move progress backwards, time old lines as latency and send their urgent patches again)."""
        saved = status.get("logCursor") or {}
        t = parse_rfc3339(saved.get("time")) if saved.get("pod") == pod else None
        if t is None:
            return cls()
        lines = int(saved.get("lines") or 0)
        return cls(last_ts=t, seen_at_last=lines, _skip=lines, last_stamp=str(saved["time"]))

    def to_status(self, pod: str) -> dict[str, Any] | None:
        if self.last_stamp is None:
            return None
        return {"pod": pod, "time": self.last_stamp, "lines": self.seen_at_last}

    def since_time(self) -> int | None:
        return int(self.last_ts) if self.last_ts is not None else None

    def reopened(self) -> None:
        """A new stream starts (from :meth:`since_time`)."""
        self._skip = self.seen_at_last

    def accept(self, t: float | None, stamp: str | None = None) -> bool:
        """Whether the line written at ``t`` (``stamp`` as the server wrote it) is new (lines without a
        timestamp always are)."""
        if t is None:
            return True
        if self.last_ts is not None and t < self.last_ts:
            return False
        if t == self.last_ts:
            if self._skip > 0:
                self._skip -= 1
                return False
            self.seen_at_last += 1
            return True
        self.last_ts, self.seen_at_last, self._skip, self.last_stamp = t, 1, 0, stamp
        return True


def status_size(status: Mapping[str, Any]) -> int:
    """Bytes of the status as JSON (what it adds to the object in etcd)."""
    return len(json.dumps(status, separators=(",", ":")))
