"""Prometheus metrics of the operator (prometheus_client), on their own registry.

Names follow Prometheus conventions (``_total`` counters, base units, ``_ratio`` for 0..1).

- ``kubetune_runs{phase}``: runs per phase (every phase is always exported, zero included);
- ``kubetune_run_transitions_total{from_phase,to_phase}``: phase changes made by this operator; every change
  the operator can make starts at 0, so that ``increase()`` sees the first one (e.g. the first failure);
- ``kubetune_reconcile_duration_seconds{handler}``: handler durations;
- ``kubetune_reconcile_errors_total{handler}``: handlers that raised, every handler starting at 0;
- ``kubetune_run_info{namespace,name,phase,model}``: 1 per run (its phase and model as labels);
- ``kubetune_run_progress_ratio`` / ``kubetune_run_eta_seconds`` / ``kubetune_run_train_loss`` /
  ``kubetune_run_val_loss`` / ``kubetune_run_samples_per_second`` ``{namespace,name}``: per-run gauges, mirrored
  from each run's status;
- ``kubetune_run_evaluation{namespace,name,stage,metric}``: evaluation before/after fine-tuning (stage), one
  series per metric the trainer reports (at most ``kubetune.api.spec.MAX_METRICS`` per stage);
- ``process_*``: CPU, memory, file descriptors of the operator process (prometheus_client's ProcessCollector);
- ``kubetune_status_lag_seconds``: from a trainer log line being written to its status patch being accepted;
- ``kubetune_log_delivery_seconds``: the first part of that lag, from the line being written (the kubelet's
  timestamp) to the operator reading it from the log stream (the node, the container runtime and the API
  server); the rest is the operator's throttle and its status patch;
- ``kubetune_jobs_created_total{reason}``, ``kubetune_job_creates_refused_total``, ``kubetune_status_patches_total``,
  ``kubetune_trainer_events_total{type}``, ``kubetune_log_streams``.

The per-run and per-phase series come from a collector over :class:`RunTable`, an in-memory table fed by the
FinetuneRun watch: a deleted run's series disappear with it, and nothing grows without bound (the other label
sets are fixed: phases, handlers, event types, Job creation reasons).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
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

PHASES = [p.value for p in Phase]
#: ``from_phase`` of a run seen for the first time (no phase yet).
NO_PHASE = "None"
#: Every handler whose errors are counted (``kubetune_reconcile_errors_total{handler}`` starts at 0 for each).
HANDLERS = ("accept", "supervisor", "create_attempt", "suspend", "update", "delete", "ttl", "run_event",
            "job_event", "pod_event")
#: Evaluation stages exported by ``kubetune_run_evaluation``.
STAGES = ("before", "after")
DEFAULT_MODEL = str(ModelSpec.model_fields["name"].default)


def possible_transitions() -> list[tuple[str, str]]:
    """(from_phase, to_phase) pairs the operator can make: from no phase or a non-terminal phase to any other
    phase (a finished run never changes phase again)."""
    sources = [NO_PHASE] + [p for p in PHASES if p not in TERMINAL_PHASES]
    return [(a, b) for a in sources for b in PHASES if a != b]


class RunTable:
    """(namespace, name) → the few status values exported per run. Thread-safe (scrapes run in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}

    def update(self, namespace: str, name: str, status: Mapping[str, Any] | None, *,
               model: str | None = None) -> None:
        """Record a run's status; ``model`` (spec.model.name) is kept from earlier updates when not given."""
        status = status or {}
        progress = status.get("progress") or {}
        metrics = status.get("metrics") or {}
        evaluation = {stage: _numbers(metrics.get(stage)) for stage in STAGES}
        row = {"phase": status.get("phase") or Phase.PENDING.value,
               "percent": progress.get("percent"),
               "eta_seconds": progress.get("etaSeconds"),
               "samples_per_second": progress.get("samplesPerSecond"),
               "train_loss": metrics.get("trainLoss"),
               "val_loss": metrics.get("valLoss"),
               "evaluation": evaluation}
        with self._lock:
            key = (namespace, name)
            previous = self._rows.get(key)
            row["model"] = model or (previous["model"] if previous else None) or DEFAULT_MODEL
            self._rows[key] = row

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._rows.pop((namespace, name), None)

    def rows(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        with self._lock:
            return list(self._rows.items())

    def __len__(self) -> int:
        return len(self._rows)


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
        rows = self.table.rows()
        runs = GaugeMetricFamily("kubetune_runs", "FinetuneRuns by phase.", labels=["phase"])
        counts = dict.fromkeys(PHASES, 0)
        for _, row in rows:
            counts[row["phase"]] = counts.get(row["phase"], 0) + 1
        for phase, count in counts.items():
            runs.add_metric([phase], count)
        yield runs
        per_run = ["namespace", "name"]
        info = GaugeMetricFamily("kubetune_run_info", "A FinetuneRun (always 1), with its phase and model.",
                                 labels=[*per_run, "phase", "model"])
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
        for (namespace, name), row in rows:
            info.add_metric([namespace, name, row["phase"], row["model"]], 1.0)
            for family, value, scale in ((progress, row["percent"], 0.01), (eta, row["eta_seconds"], 1.0),
                                         (loss, row["train_loss"], 1.0), (val_loss, row["val_loss"], 1.0),
                                         (sps, row["samples_per_second"], 1.0)):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([namespace, name], float(value) * scale)
            for stage, values in row["evaluation"].items():
                for metric, value in sorted(values.items()):
                    evaluation.add_metric([namespace, name, stage, metric], value)
        yield info
        yield progress
        yield eta
        yield loss
        yield val_loss
        yield sps
        yield evaluation


class Metrics:
    """All metric objects of one operator process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.table = RunTable()
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
                                    registry=r, buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60))
        self.log_delivery = Histogram("kubetune_log_delivery_seconds",
                                      "Delay from a trainer log line being written to the operator reading it.",
                                      registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60))
        self.jobs_created = Counter("kubetune_jobs_created_total", "Trainer Jobs created.", ["reason"], registry=r)
        self.jobs_refused = Counter("kubetune_job_creates_refused_total",
                                    "Trainer Job (or ConfigMap) creates the API server refused.", registry=r)
        self.status_patches = Counter("kubetune_status_patches_total", "Status patches sent by log followers.",
                                      registry=r)
        self.trainer_events = Counter("kubetune_trainer_events_total", "Structured trainer events parsed.",
                                      ["type"], registry=r)
        self.log_streams = Gauge("kubetune_log_streams", "Trainer pod logs being followed.", registry=r)
        self.info = Gauge("kubetune_operator_info", "Operator build and cluster information.",
                          ["version", "kubernetes"], registry=r)

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
