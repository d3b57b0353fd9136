"""Pure status derivation: trainer events and Job/pod state → a bounded FinetuneRun status patch.

Nothing here talks to Kubernetes. The operator's log follower feeds each log line to a :class:`StatusFolder`,
takes a coalesced patch with :meth:`StatusFolder.take_patch` when its :class:`Throttle` says so, and asks
:func:`attempt_outcome` what a finished trainer pod means (success, retry from checkpoint, or failure).

Bounds (so that a run never makes its object large): at most ``LOG_TAIL_LINES`` lines of at most
``LOG_LINE_MAX_CHARS`` characters, at most ``MAX_METRICS`` evaluation metrics per stage, messages cut at
``MESSAGE_MAX_CHARS``, at most 16 conditions.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from kubetune.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_OK, RETRYABLE_EXIT_CODES, Event, parse_line
from kubetune.spec import (
    CANCEL_ANNOTATION,
    CANCEL_BY_ANNOTATION,
    LOG_LINE_MAX_CHARS,
    LOG_TAIL_LINES,
    MAX_METRICS,
    MESSAGE_MAX_CHARS,
    TERMINAL_PHASES,
    Phase,
)

MAX_CONDITIONS = 16
_REASON_MAX = 128

# Condition types.
CREATED = "Created"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CANCELLED = "Cancelled"
CLEANED_UP = "CleanedUp"
JOB_CREATE_FAILED = "JobCreateFailed"  # the API server refused the attempt's Job (message: its answer)
SPEC_VALID = "SpecValid"  # False after an invalid spec edit: the run goes on with its last valid spec
# Condition types that describe the phase: exactly the one matching the phase is True.
_PHASE_CONDITION = {
    Phase.RUNNING.value: RUNNING,
    Phase.SUSPENDED.value: SUSPENDED,
    Phase.SUCCEEDED.value: SUCCEEDED,
    Phase.FAILED.value: FAILED,
    Phase.CANCELLED.value: CANCELLED,
}


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


# ------------------------------------------------------------------------------------------- conditions
def set_condition(conditions: Iterable[Mapping[str, Any]], type_: str, status: str, reason: str,
                  message: str | None, now: float) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set. ``lastTransitionTime`` changes only when status changes."""
    out = [dict(c) for c in conditions]
    new = {"type": type_, "status": status, "reason": reason[:_REASON_MAX],
           "message": clip(message) or "", "lastTransitionTime": now_rfc3339(now)}
    for i, cond in enumerate(out):
        if cond.get("type") == type_:
            if cond.get("status") == status:
                new["lastTransitionTime"] = cond.get("lastTransitionTime") or new["lastTransitionTime"]
            out[i] = new
            break
    else:
        out.append(new)
    return out[-MAX_CONDITIONS:]


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def transition(status: Mapping[str, Any], phase: str, reason: str, message: str | None,
               now: float) -> dict[str, Any]:
    """Patch for moving to ``phase``: phase, message, phase conditions, start/completion times. Pure."""
    conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or ()]
    for ph, ctype in _PHASE_CONDITION.items():
        prior = get_condition(conditions, ctype)
        if ph == phase:
            conditions = set_condition(conditions, ctype, "True", reason, message, now)
        elif prior is not None and prior.get("status") == "True":
            conditions = set_condition(conditions, ctype, "False", reason, message, now)
    if phase == Phase.RUNNING.value or phase in TERMINAL_PHASES:
        restarting = get_condition(conditions, RESTARTING)
        if restarting is not None and restarting.get("status") == "True":
            conditions = set_condition(conditions, RESTARTING, "False", reason, message, now)
    patch: dict[str, Any] = {"phase": phase, "message": clip(message), "conditions": conditions}
    if phase == Phase.RUNNING.value and not status.get("startTime"):
        patch["startTime"] = now_rfc3339(now)
    if phase in TERMINAL_PHASES:
        patch["completionTime"] = now_rfc3339(now)
    return patch


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


# ------------------------------------------------------------------------------------------- pods & jobs
@dataclasses.dataclass(frozen=True)
class PodState:
    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    exit_code: int | None = None
    reason: str | None = None  # terminated reason (OOMKilled, Error, Completed) or pod reason (Evicted)
    message: str | None = None
    waiting_reason: str | None = None  # ImagePullBackOff, CreateContainerConfigError, ...
    started: bool = False  # the trainer container has started (its log can be followed)
    created: float | None = None
    scheduled: bool = False  # bound to a node: its log can be followed as soon as the container starts
    deleting: bool = False  # has a deletionTimestamp: deleted (by a user, a drain) and going away
    gone: bool = False  # removed from the API server; this is the last state the watch reported

    @property
    def terminated(self) -> bool:
        return self.phase in {"Succeeded", "Failed"}

    @property
    def succeeded(self) -> bool:
        """The trainer exited 0: the attempt's result is known even if the pod is deleted right after."""
        return self.terminated and self.exit_code == 0

    @property
    def alive(self) -> bool:
        """A trainer that may still run (and write checkpoints): neither terminated nor removed."""
        return not self.gone and not self.terminated


def pod_state(pod: Mapping[str, Any], container: str = "trainer") -> PodState:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    state = PodState(name=meta.get("name", ""), phase=status.get("phase") or "Pending",
                     reason=status.get("reason"), message=status.get("message"),
                     created=parse_rfc3339(meta.get("creationTimestamp")),
                     scheduled=bool((pod.get("spec") or {}).get("nodeName")),
                     deleting=bool(meta.get("deletionTimestamp")))
    for cs in status.get("containerStatuses") or ():
        if cs.get("name") != container:
            continue
        st = cs.get("state") or {}
        last = cs.get("lastState") or {}
        term = st.get("terminated") or last.get("terminated")
        if term:
            return dataclasses.replace(state, exit_code=term.get("exitCode"),
                                       reason=term.get("reason") or state.reason,
                                       message=term.get("message") or state.message, started=True)
        if "running" in st:
            return dataclasses.replace(state, started=True)
        waiting = st.get("waiting") or {}
        return dataclasses.replace(state, waiting_reason=waiting.get("reason"),
                                   message=waiting.get("message") or state.message)
    return state


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
        operator reads on from the last line folded into the status instead of replaying the whole log (which
        moved progress backwards, re-timed old lines as latency and sent their urgent patches again)."""
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


@dataclasses.dataclass(frozen=True)
class JobState:
    name: str
    complete: bool = False
    failed: bool = False
    reason: str | None = None
    message: str | None = None


def job_state(job: Mapping[str, Any]) -> JobState:
    name = (job.get("metadata") or {}).get("name", "")
    for cond in (job.get("status") or {}).get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return JobState(name, complete=True, reason=cond.get("reason"), message=cond.get("message"))
        if cond.get("type") == "Failed":
            return JobState(name, failed=True, reason=cond.get("reason"), message=cond.get("message"))
    return JobState(name)


# ------------------------------------------------------------------------------------------- outcome
@dataclasses.dataclass(frozen=True)
class Outcome:
    action: str  # "succeed" | "retry" | "fail"
    reason: str
    message: str


PERMANENT_REASONS = {EXIT_BAD_CONFIG: "InvalidConfig", EXIT_BAD_DATA: "BadData"}


POD_DELETED = "PodDeleted"  # the attempt's pod was deleted and its Job gave up instead of replacing it


def attempt_outcome(*, exit_code: int | None, pod_reason: str | None = None, job: JobState | None = None,
                    failed_event: Event | None = None, retries: int, backoff_limit: int) -> Outcome:
    """What a finished attempt means for the run. Pure.

    - exit 0 → succeed;
    - the Job's deadline (``DeadlineExceeded``) → fail (the run's activeDeadlineSeconds is spent);
    - OOMKilled → fail (it would run out of memory again);
    - exit 75 (EX_TEMPFAIL), 137/143 (killed: preemption, eviction), an evicted or deleted pod, or a trainer
      ``failed`` event with ``retryable: true`` → retry from the latest checkpoint while ``retries < backoff_limit``;
    - 78 (bad config), 65 (bad data), 1 and anything else → fail fast.
    """
    event_msg = (failed_event.message or "") if failed_event else ""
    if exit_code == EXIT_OK or (exit_code is None and job is not None and job.complete):
        return Outcome("succeed", "TrainingSucceeded", "The trainer finished and published the artifact.")
    if job is not None and job.failed and job.reason == "DeadlineExceeded":
        return Outcome("fail", "DeadlineExceeded",
                       clip(f"The run exceeded spec.runPolicy.activeDeadlineSeconds. {job.message or ''}") or "")
    if pod_reason == "OOMKilled":
        return Outcome("fail", "OutOfMemory", "The trainer ran out of memory (OOMKilled); raise "
                       "spec.resources.memory or lower spec.training.batchSize.")
    if exit_code in PERMANENT_REASONS:
        reason = (failed_event.reason if failed_event and failed_event.reason else PERMANENT_REASONS[exit_code])
        return Outcome("fail", reason, clip(f"Trainer exited with code {exit_code} (permanent). {event_msg}") or "")
    retryable = (exit_code in RETRYABLE_EXIT_CODES or pod_reason in {"Evicted", "Preempted", "Shutdown", POD_DELETED}
                 or (exit_code is None and job is None)
                 or bool(failed_event and failed_event.retryable))
    what = f"exit code {exit_code}" if exit_code is not None else (pod_reason or "pod lost")
    if retryable:
        if retries < backoff_limit:
            return Outcome("retry", "RetryableFailure", clip(
                f"Trainer attempt failed ({what}); retry {retries + 1}/{backoff_limit} from the latest "
                f"checkpoint. {event_msg}") or "")
        return Outcome("fail", "BackoffLimitExceeded", clip(
            f"Trainer failed ({what}) and spec.runPolicy.backoffLimit={backoff_limit} retries are used up. "
            f"{event_msg}") or "")
    reason = failed_event.reason if failed_event and failed_event.reason else "TrainerError"
    return Outcome("fail", reason, clip(f"Trainer failed ({what}). {event_msg}") or "")


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    return bool(status) and (status or {}).get("phase") in TERMINAL_PHASES


def cancel_request(meta: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``{"at": ..., "by": ...}`` (values possibly empty) when the run carries the cancel annotation. Pure."""
    annotations = (meta or {}).get("annotations") or {}
    if CANCEL_ANNOTATION not in annotations:
        return None
    return {"at": str(annotations.get(CANCEL_ANNOTATION) or "").strip(),
            "by": str(annotations.get(CANCEL_BY_ANNOTATION) or "").strip()}


def cancel_pending(meta: Mapping[str, Any] | None, status: Mapping[str, Any] | None) -> bool:
    """Whether the operator must cancel the run now: it carries the cancel annotation and has not ended. Pure.

    A run that ended (Succeeded/Failed/Cancelled) keeps its phase; a cancelled run is terminal, so nothing
    (resume after an operator restart, unsuspending) starts it again."""
    return cancel_request(meta) is not None and not is_terminal(status)


def cancel_update(status: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, deleted_jobs: int,
                  now: float) -> dict[str, Any]:
    """Status patch ending the run ``Cancelled`` (reason ``Cancelled``, completionTime). Pure."""
    request = cancel_request(meta) or {"at": "", "by": ""}
    who = f" by {request['by']}" if request["by"] else ""
    when = f" at {request['at']}" if request["at"] else ""
    message = (f"Cancelled{who}{when} ({CANCEL_ANNOTATION}): deleted {deleted_jobs} Job(s); checkpoints are "
               "kept; the run is never re-launched.")
    return transition(status or {}, Phase.CANCELLED.value, "Cancelled", message, now)


def ttl_due(status: Mapping[str, Any] | None, ttl_seconds: int | None, now: float) -> bool:
    """Whether the TTL after finish has passed (and children were not already cleaned up)."""
    if ttl_seconds is None or not is_terminal(status):
        return False
    cond = get_condition((status or {}).get("conditions"), CLEANED_UP)
    if cond is not None and cond.get("status") == "True":
        return False
    finished = parse_rfc3339((status or {}).get("completionTime"))
    return finished is not None and now >= finished + ttl_seconds


def status_size(status: Mapping[str, Any]) -> int:
    """Bytes of the status as JSON (what it adds to the object in etcd)."""
    import json

    return len(json.dumps(status, separators=(",", ":")))
