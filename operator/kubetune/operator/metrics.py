"""Prometheus metrics of the operator (prometheus_client), on their own registry.

Names follow Prometheus conventions (``_total`` counters, base units, ``_ratio`` for 0..1, Unix times as
``_time_seconds``).

- ``kubetune_runs{phase}``: runs per phase, every existing run counted (every phase is always exported, zero
  included);
- ``kubetune_run_transitions_total{from_phase,to_phase}``: phase changes made by this operator; every change
  the operator can make starts at 0, so that ``increase()`` sees the first one (e.g. the first failure);
- ``kubetune_reconcile_duration_seconds{handler}``: handler durations;
- ``kubetune_reconcile_errors_total{handler}``: handlers that raised, every handler starting at 0;
- per run, ``{namespace,name}`` plus the labels named:

  - ``kubetune_run_info{phase,model}``: always 1;
  - ``kubetune_run_phase_start_time_seconds{phase}``: when the run entered its phase (from its status conditions
    and creation time, so an operator restart does not reset it; else when this process first saw the phase);
  - ``kubetune_run_last_progress_time_seconds``: while Running, when its training step last moved (or it
    started Running, or this process first saw it);
  - ``kubetune_run_pod_info{pod}``: 1 for the trainer pod in ``status.podName``, to join pod-level exporters
    (DCGM) to runs by pod name: run names longer than 63 characters are shortened in pod and label values;
  - ``kubetune_run_progress_ratio`` / ``kubetune_run_eta_seconds`` / ``kubetune_run_train_loss`` /
    ``kubetune_run_val_loss`` / ``kubetune_run_samples_per_second``: mirrored from the status;
  - ``kubetune_run_evaluation{stage,metric}``: evaluation before/after fine-tuning (stage), one series per metric
    the trainer reports (at most ``kubetune.api.spec.MAX_METRICS`` per stage);
- ``process_*``: CPU, memory, file descriptors of the operator process (prometheus_client's ProcessCollector);
- ``kubetune_status_lag_seconds``: from a trainer log line being written to its status patch being accepted;
- ``kubetune_log_delivery_seconds``: the first part of that lag, from the line being written (the kubelet's
  timestamp) to the operator reading it from the log stream (the node, the container runtime and the API
  server); the rest is the operator's throttle and its status patch;
- ``kubetune_jobs_created_total{reason}``, ``kubetune_job_creates_refused_total``, ``kubetune_status_patches_total``,
  ``kubetune_trainer_events_total{type}``, ``kubetune_log_streams``, ``kubetune_log_open_errors_total``;
- ``kubetune_api_requests_total{verb,code}``: the operator's own API requests (kopf's watches aside), by verb and
  answer class (``2xx`` ... ``5xx``, ``error``: no answer).

The per-run and per-phase series come from a collector over :class:`RunTable`, an in-memory table fed by the
FinetuneRun watch and the supervisors. Per-run series are bounded: a finished run (Succeeded, Failed,
Cancelled) keeps them for ``FINISHED_RUN_SECONDS`` after it finished (long enough for Prometheus to record its
final values), and only the ``MAX_FINISHED_RUNS`` most recently finished runs do; then they go, while
``kubetune_runs`` still counts the run until it is deleted. The other label sets are fixed: phases, handlers,
event types, Job creation reasons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.api.spec import MAX_METRICS, TERMINAL_PHASES, ModelSpec, Phase
from kubetune.lifecycle.conditions import CANCELLED, FAILED, RUNNING, SUCCEEDED, SUSPENDED
from kubetune.lifecycle.formats import parse_rfc3339

PHASES = [p.value for p in Phase]
#: ``from_phase`` of a run seen for the first time (no phase yet).
NO_PHASE = "None"
#: Every handler whose errors are counted (``kubetune_reconcile_errors_total{handler}`` starts at 0 for each).
HANDLERS = ("accept", "supervisor", "create_attempt", "suspend", "update", "delete", "ttl", "run_event",
            "job_event", "pod_event")
#: Evaluation stages exported by ``kubetune_run_evaluation``.
STAGES = ("before", "after")
DEFAULT_MODEL = str(ModelSpec.model_fields["name"].default)
#: How long a finished run's series stay: several scrapes at any usual interval, so its final values are
#: recorded, without a busy cluster's finished runs piling up (~134 series each with full evaluations).
FINISHED_RUN_SECONDS = 900.0
#: At most this many finished runs keep their series (the most recently finished).
MAX_FINISHED_RUNS = 50
#: Buckets (seconds) of the status-lag and log-delivery histograms: up to 10 minutes, since a contended API
#: server has been seen to delay a log line by over two minutes.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300, 600)
# The condition of each phase but Pending (kubetune.lifecycle.conditions): its lastTransitionTime says when the
# phase was entered (status True) or left (status False).
_PHASE_CONDITIONS = {Phase.RUNNING.value: RUNNING, Phase.SUSPENDED.value: SUSPENDED,
                     Phase.SUCCEEDED.value: SUCCEEDED, Phase.FAILED.value: FAILED, Phase.CANCELLED.value: CANCELLED}


def possible_transitions() -> list[tuple[str, str]]:
    """(from_phase, to_phase) pairs the operator can make: from no phase or a non-terminal phase to any other
    phase (a finished run never changes phase again)."""
    sources = [NO_PHASE] + [p for p in PHASES if p not in TERMINAL_PHASES]
    return [(a, b) for a in sources for b in PHASES if a != b]


def phase_start_time(status: Mapping[str, Any], created: float | None) -> float | None:
    """When the run entered its current phase, as far as its status tells (None when it does not). Pending has
    no condition of its own: it began when the run was created or when the phase before it ended (that phase's
    condition turned False)."""
    phase = status.get("phase") or Phase.PENDING.value
    conditions = [c for c in status.get("conditions") or () if isinstance(c, Mapping)]
    if phase == Phase.PENDING.value:
        ended = [parse_rfc3339(c.get("lastTransitionTime")) for c in conditions
                 if c.get("type") in _PHASE_CONDITIONS.values() and c.get("status") == "False"]
        known = [t for t in (*ended, created) if t is not None]
        return max(known) if known else None
    for c in conditions:
        if c.get("type") == _PHASE_CONDITIONS.get(phase) and c.get("status") == "True":
            return parse_rfc3339(c.get("lastTransitionTime"))
    return None


@dataclasses.dataclass(frozen=True)
class RunRow:
    """What is exported of one run."""

    phase: str
    model: str
    phase_start: float
    #: The training step (else the percent done) and when it last moved.
    step: float | None
    progress_time: float
    #: When the run finished (None while it is active).
    finished: float | None
    created: float | None = None
    pod: str | None = None
    percent: Any = None
    eta_seconds: Any = None
    samples_per_second: Any = None
    train_loss: Any = None
    val_loss: Any = None
    evaluation: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)


def next_row(previous: RunRow | None, status: Mapping[str, Any], model: str | None, created: float | None,
             now: float) -> RunRow:
    """A run's row after an observation of its status at ``now``. Pure."""
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    phase = status.get("phase") or Phase.PENDING.value
    created = created if created is not None else (previous.created if previous else None)
    same_phase = previous is not None and previous.phase == phase
    phase_start = phase_start_time(status, created)
    if phase_start is None:
        phase_start = previous.phase_start if previous is not None and same_phase else now
    step = _number(progress.get("step"))
    if step is None:
        step = _number(progress.get("percent"))
    finished = None
    if phase in TERMINAL_PHASES:
        finished = parse_rfc3339(status.get("completionTime"))
        if finished is None:
            finished = previous.finished if previous is not None and previous.finished is not None else now
    return RunRow(phase=phase, model=model or (previous.model if previous else None) or DEFAULT_MODEL,
                  phase_start=phase_start, step=step,
                  progress_time=previous.progress_time if same_phase and previous and previous.step == step else now,
                  finished=finished, created=created, pod=status.get("podName") or None,
                  percent=progress.get("percent"), eta_seconds=progress.get("etaSeconds"),
                  samples_per_second=progress.get("samplesPerSecond"), train_loss=metrics.get("trainLoss"),
                  val_loss=metrics.get("valLoss"),
                  evaluation={stage: _numbers(metrics.get(stage)) for stage in STAGES})


class RunTable:
    """(namespace, name) → the few status values exported per run. Thread-safe (scrapes run in a thread)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, finished_run_seconds: float = FINISHED_RUN_SECONDS,
                 max_finished_runs: int = MAX_FINISHED_RUNS) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], RunRow] = {}
        self.clock = clock
        self.finished_run_seconds = finished_run_seconds
        self.max_finished_runs = max_finished_runs

    def update(self, namespace: str, name: str, status: Mapping[str, Any] | None, *,
               model: str | None = None, created: str | None = None) -> None:
        """Record a run's status; ``model`` (spec.model.name) and ``created`` (metadata.creationTimestamp) are
        kept from earlier updates when not given."""
        now = self.clock()
        with self._lock:
            key = (namespace, name)
            self._rows[key] = next_row(self._rows.get(key), status or {}, model, parse_rfc3339(created), now)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._rows.pop((namespace, name), None)

    def rows(self) -> list[tuple[tuple[str, str], RunRow]]:
        with self._lock:
            return list(self._rows.items())

    def exported(self) -> list[tuple[tuple[str, str], RunRow]]:
        """The rows whose per-run series are exported now: every active run, and the most recently finished
        runs within the retention (see the module docstring)."""
        now = self.clock()
        rows = self.rows()
        active = [(k, r) for k, r in rows if r.finished is None]
        recent = [(k, r) for k, r in rows if r.finished is not None and now - r.finished <= self.finished_run_seconds]
        recent.sort(key=lambda kr: kr[1].finished or 0.0, reverse=True)
        return active + recent[:self.max_finished_runs]

    def __len__(self) -> int:
        return len(self._rows)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _numbers(values: Any) -> dict[str, float]:
    """The numeric entries of a status metrics dict (e.g. ``status.metrics.after``)."""
    if not isinstance(values, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(out) < MAX_METRICS:
            out[str(key)[:100]] = float(value)
    return out


class RunCollector(Collector):
    def __init__(self, table: RunTable) -> None:
        self.table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = GaugeMetricFamily("kubetune_runs", "FinetuneRuns by phase.", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for _, row in self.table.rows():
            counts[row.phase] = counts.get(row.phase, 0) + 1
        for phase, count in counts.items():
            runs.add_metric([phase], count)
        yield runs
        per_run = ["namespace", "name"]
        info = GaugeMetricFamily("kubetune_run_info", "A FinetuneRun (always 1), with its phase and model.",
                                 labels=[*per_run, "phase", "model"])
        phase_start = GaugeMetricFamily("kubetune_run_phase_start_time_seconds",
                                        "Unix time a run entered its current phase.", labels=[*per_run, "phase"])
        progress_time = GaugeMetricFamily("kubetune_run_last_progress_time_seconds",
                                          "Unix time a Running run's training step last moved.", labels=per_run)
        pod = GaugeMetricFamily("kubetune_run_pod_info", "A run's current trainer pod (always 1).",
                                labels=[*per_run, "pod"])
        progress = GaugeMetricFamily("kubetune_run_progress_ratio", "Training progress of a run (0..1).",
                                     labels=per_run)
        eta = GaugeMetricFamily("kubetune_run_eta_seconds", "Estimated seconds until a run's training ends.",
                                labels=per_run)
        loss = GaugeMetricFamily("kubetune_run_train_loss", "Latest training loss of a run.", labels=per_run)
        val_loss = GaugeMetricFamily("kubetune_run_val_loss", "Latest validation loss of a run.", labels=per_run)
        sps = GaugeMetricFamily("kubetune_run_samples_per_second", "Training throughput of a run.",
                                labels=per_run)
        evaluation = GaugeMetricFamily("kubetune_run_evaluation",
                                       "Evaluation metrics of a run before and after fine-tuning (stage).",
                                       labels=[*per_run, "stage", "metric"])
        for (namespace, name), row in self.table.exported():
            info.add_metric([namespace, name, row.phase, row.model], 1.0)
            phase_start.add_metric([namespace, name, row.phase], row.phase_start)
            if row.phase == Phase.RUNNING.value:
                progress_time.add_metric([namespace, name], row.progress_time)
            if row.pod:
                pod.add_metric([namespace, name, row.pod], 1.0)
            for family, value, scale in ((progress, row.percent, 0.01), (eta, row.eta_seconds, 1.0),
                                         (loss, row.train_loss, 1.0), (val_loss, row.val_loss, 1.0),
                                         (sps, row.samples_per_second, 1.0)):
                number = _number(value)
                if number is not None:
                    family.add_metric([namespace, name], number * scale)
            for stage, values in row.evaluation.items():
                for metric, value in sorted(values.items()):
                    evaluation.add_metric([namespace, name, stage, metric], value)
        yield from (info, phase_start, progress_time, pod, progress, eta, loss, val_loss, sps, evaluation)


class Metrics:
    """All metric objects of one operator process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.table = RunTable(clock)
        self.registry.register(RunCollector(self.table))
        r = self.registry
        ProcessCollector(registry=r)
        self.transitions = Counter("kubetune_run_transitions_total", "Run phase transitions made by the operator.",
                                   ["from_phase", "to_phase"], registry=r)
        for old, new in possible_transitions():
            self.transitions.labels(from_phase=old, to_phase=new)
        self.reconcile = Histogram("kubetune_reconcile_duration_seconds", "Duration of operator handlers.",
                                   ["handler"], registry=r,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.errors = Counter("kubetune_reconcile_errors_total", "Operator handlers that raised an error.",
                              ["handler"], registry=r)
        for handler in HANDLERS:
            self.errors.labels(handler=handler)
        self.status_lag = Histogram("kubetune_status_lag_seconds",
                                    "Delay from a trainer log line being written to the run's status showing it.",
                                    registry=r, buckets=LAG_BUCKETS[1:])
        self.log_delivery = Histogram("kubetune_log_delivery_seconds",
                                      "Delay from a trainer log line being written to the operator reading it.",
                                      registry=r, buckets=LAG_BUCKETS)
        self.jobs_created = Counter("kubetune_jobs_created_total", "Trainer Jobs created.", ["reason"], registry=r)
        self.jobs_refused = Counter("kubetune_job_creates_refused_total",
                                    "Trainer Job creates the API server refused.", registry=r)
        self.status_patches = Counter("kubetune_status_patches_total", "Status patches sent by log followers.",
                                      registry=r)
        self.trainer_events = Counter("kubetune_trainer_events_total", "Structured trainer events parsed.",
                                      ["type"], registry=r)
        self.log_streams = Gauge("kubetune_log_streams", "Trainer pod logs being followed.", registry=r)
        self.log_open_errors = Counter("kubetune_log_open_errors_total",
                                       "Trainer log streams that could not be opened (the container not started, "
                                       "the API server or kubelet refusing).", registry=r)
        self.api_requests = Counter("kubetune_api_requests_total",
                                    "Kubernetes API requests of the operator's own client, by verb (STREAM: a "
                                    "followed log) and answer class (error: none); kopf's watches not included.",
                                    ["verb", "code"], registry=r)
        self.info = Gauge("kubetune_operator_info", "Operator build and cluster information.",
                          ["version", "kubernetes"], registry=r)

    def api_request(self, verb: str, status: int) -> None:
        self.api_requests.labels(verb=verb, code=f"{status // 100}xx" if status else "error").inc()

    def transition(self, old: str | None, new: str) -> None:
        if old != new:
            self.transitions.labels(from_phase=old or NO_PHASE, to_phase=new).inc()

    @contextlib.contextmanager
    def counting_errors(self, handler: str) -> Iterator[None]:
        """Count an exception raised in the block (and re-raise it); cancellation is not an error."""
        try:
            yield
        except Exception:
            self.errors.labels(handler=handler).inc()
            raise

    @contextlib.contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        """Time the block and count its errors."""
        start = time.perf_counter()
        try:
            with self.counting_errors(handler):
                yield
        finally:
            self.reconcile.labels(handler=handler).observe(time.perf_counter() - start)

    def observe_lag(self, written: list[float], now: float) -> None:
        for t in written:
            self.status_lag.observe(max(0.0, now - t))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
