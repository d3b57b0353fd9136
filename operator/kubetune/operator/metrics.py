"""Prometheus metrics of the operator (prometheus_client), on their own registry.

Names follow Prometheus conventions (``_total`` counters, base units, ``_ratio`` for 0..1).

- ``kubetune_runs{phase}``: runs per phase (every phase is always exported, zero included);
- ``kubetune_run_transitions_total{from_phase,to_phase}``: phase changes made by this operator;
- ``kubetune_reconcile_duration_seconds{handler}``: handler durations;
- ``kubetune_run_progress_ratio`` / ``kubetune_run_train_loss`` / ``kubetune_run_samples_per_second``
  ``{namespace,name}``: per-run gauges, mirrored from each run's status;
- ``kubetune_status_lag_seconds``: from a trainer log line being written to its status patch being accepted;
- ``kubetune_jobs_created_total{reason}``, ``kubetune_status_patches_total``,
  ``kubetune_trainer_events_total{type}``, ``kubetune_log_streams``.

The per-run and per-phase series come from a collector over :class:`RunTable`, an in-memory table fed by the
FinetuneRun watch: a deleted run's series disappear with it, and nothing grows without bound.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.spec import Phase

PHASES = [p.value for p in Phase]


class RunTable:
    """(namespace, name) → the few status values exported per run. Thread-safe (scrapes run in a thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}

    def update(self, namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
        status = status or {}
        progress = status.get("progress") or {}
        metrics = status.get("metrics") or {}
        row = {"phase": status.get("phase") or Phase.PENDING.value,
               "percent": progress.get("percent"),
               "samples_per_second": progress.get("samplesPerSecond"),
               "train_loss": metrics.get("trainLoss")}
        with self._lock:
            self._rows[(namespace, name)] = row

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._rows.pop((namespace, name), None)

    def rows(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        with self._lock:
            return list(self._rows.items())

    def __len__(self) -> int:
        return len(self._rows)


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
        progress = GaugeMetricFamily("kubetune_run_progress_ratio", "Training progress of a run (0..1).",
                                     labels=["namespace", "name"])
        loss = GaugeMetricFamily("kubetune_run_train_loss", "Latest training loss of a run.",
                                 labels=["namespace", "name"])
        sps = GaugeMetricFamily("kubetune_run_samples_per_second", "Training throughput of a run.",
                                labels=["namespace", "name"])
        for (namespace, name), row in rows:
            if row["percent"] is not None:
                progress.add_metric([namespace, name], float(row["percent"]) / 100.0)
            if row["train_loss"] is not None:
                loss.add_metric([namespace, name], float(row["train_loss"]))
            if row["samples_per_second"] is not None:
                sps.add_metric([namespace, name], float(row["samples_per_second"]))
        yield progress
        yield loss
        yield sps


class Metrics:
    """All metric objects of one operator process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.table = RunTable()
        self.registry.register(RunCollector(self.table))
        r = self.registry
        self.transitions = Counter("kubetune_run_transitions_total", "Run phase transitions made by the operator.",
                                   ["from_phase", "to_phase"], registry=r)
        self.reconcile = Histogram("kubetune_reconcile_duration_seconds", "Duration of operator handlers.",
                                   ["handler"], registry=r,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.status_lag = Histogram("kubetune_status_lag_seconds",
                                    "Delay from a trainer log line being written to the run's status showing it.",
                                    registry=r, buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60))
        self.jobs_created = Counter("kubetune_jobs_created_total", "Trainer Jobs created.", ["reason"], registry=r)
        self.status_patches = Counter("kubetune_status_patches_total", "Status patches sent by log followers.",
                                      registry=r)
        self.trainer_events = Counter("kubetune_trainer_events_total", "Structured trainer events parsed.",
                                      ["type"], registry=r)
        self.log_streams = Gauge("kubetune_log_streams", "Trainer pod logs being followed.", registry=r)
        self.info = Gauge("kubetune_operator_info", "Operator build and cluster information.",
                          ["version", "kubernetes"], registry=r)

    def transition(self, old: str | None, new: str) -> None:
        if old != new:
            self.transitions.labels(from_phase=old or "None", to_phase=new).inc()

    @contextlib.contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
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
