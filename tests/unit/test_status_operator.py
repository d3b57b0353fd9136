"""Pure parts of the operator package: spec validation with field paths, metric names, the Job/pod index,
the status-patch token bucket, and kopf settings."""

from __future__ import annotations

import asyncio
import time

import kopf
import pytest
from kubetune.operator.context import ChildIndex, TokenBucket
from kubetune.operator.handlers import FINALIZER, configure_kopf
from kubetune.operator.kube import split_log_line
from kubetune.operator.metrics import Metrics
from kubetune.operator.supervisor import format_errors, validate

pytestmark = pytest.mark.unit


def test_validate_reports_field_and_cross_field_paths() -> None:
    model, errors = validate({"data": {"train": "s3://b/t.csv"}})
    assert model is not None and errors == []
    _, errors = validate({"data": {"train": "s3://b/t.csv", "eval": "s3://b/e.csv", "valSplit": 0.2},
                          "training": {"lockImage": True, "lockText": True}})
    paths = [p for p, _ in errors]
    assert paths == ["spec.data.valSplit", "spec.training.lockText"]
    _, errors = validate({"data": {"train": ""}, "training": {"epochs": 0}})
    assert {p for p, _ in errors} == {"spec.data.train", "spec.training.epochs"}
    assert "spec.training.epochs" in format_errors(errors)


def test_metric_names_and_exposition() -> None:
    m = Metrics()
    m.table.update("ns", "a", {"phase": "Running", "progress": {"percent": 40.0, "samplesPerSecond": 10.0},
                               "metrics": {"trainLoss": 1.5}})
    m.table.update("ns", "b", {})
    m.transition(None, "Pending")
    m.transition("Pending", "Running")
    m.transition("Running", "Running")  # not a transition
    with m.timed("accept"):
        pass
    m.observe_lag([time.time() - 0.5], time.time())
    text = m.exposition().decode()
    assert 'kubetune_runs{phase="Running"} 1.0' in text and 'kubetune_runs{phase="Pending"} 1.0' in text
    assert 'kubetune_runs{phase="Cancelled"} 0.0' in text
    assert 'kubetune_run_progress_ratio{name="a",namespace="ns"} 0.4' in text
    assert 'kubetune_run_train_loss{name="a",namespace="ns"} 1.5' in text
    assert 'kubetune_run_samples_per_second{name="a",namespace="ns"} 10.0' in text
    assert 'kubetune_run_transitions_total{from_phase="Pending",to_phase="Running"} 1.0' in text
    assert "kubetune_reconcile_duration_seconds_count" in text and "kubetune_status_lag_seconds_bucket" in text
    m.table.forget("ns", "a")
    assert 'name="a"' not in m.exposition().decode()


def _pod(name: str, attempt: int, phase: str, created: str, container: dict | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created,
                         "labels": {"kubetune.io/run": "r", "kubetune.io/attempt": str(attempt)}},
            "spec": {"nodeName": "node"},
            "status": {"phase": phase, "containerStatuses": [container] if container else []}}


def test_child_index_tracks_newest_pod_per_attempt_and_wakes_waiters() -> None:
    async def scenario() -> None:
        index = ChildIndex()
        changed = index.register(("ns", "r"))
        index.on_pod("ADDED", _pod("p1", 1, "Failed", "2026-01-01T00:00:00Z",
                                   {"name": "trainer", "state": {"terminated": {"exitCode": 75}}}))
        assert changed.is_set()
        index.on_pod("ADDED", _pod("p2", 2, "Pending", "2026-01-01T00:01:00Z"))
        index.on_pod("ADDED", _pod("p3", 2, "Running", "2026-01-01T00:02:00Z",
                                   {"name": "trainer", "state": {"running": {}}}))
        pod1, pod2 = index.pod(("ns", "r"), 1), index.pod(("ns", "r"), 2)
        assert pod1 is not None and pod1.exit_code == 75 and pod1.terminated
        assert pod2 is not None and pod2.name == "p3" and pod2.started and pod2.scheduled
        index.on_pod("DELETED", _pod("p3", 2, "Running", "2026-01-01T00:02:00Z"))
        assert index.pod(("ns", "r"), 2).name == "p2"  # type: ignore[union-attr]
        index.on_job("ADDED", {"metadata": {"name": "r-a1", "namespace": "ns", "labels": {"kubetune.io/run": "r"}},
                               "status": {"conditions": [{"type": "Failed", "status": "True"}]}})
        assert index.job("ns", "r-a1").failed  # type: ignore[union-attr]
        index.on_pod("ADDED", {"metadata": {"name": "other", "namespace": "ns"}})  # unlabelled: ignored
        index.forget_run(("ns", "r"))
        assert index.pod(("ns", "r"), 2) is None

    asyncio.run(scenario())


def test_token_bucket_limits_rate() -> None:
    async def scenario() -> float:
        bucket = TokenBucket(rate=20.0, burst=5.0)
        start = time.monotonic()
        for _ in range(15):
            await bucket.acquire()
        return time.monotonic() - start

    elapsed = asyncio.run(scenario())
    assert 0.4 <= elapsed < 2.0  # 5 at once, then 10 at 20/s


def test_kopf_settings_use_own_prefixes() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, peering_name="kt", instance="test")
    assert settings.persistence.finalizer == FINALIZER == "kubetune.io/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.peering.name == "kt" and settings.peering.mandatory is False
    assert settings.posting.reporting_component == "kubetune-operator"


def test_split_log_line() -> None:
    assert split_log_line("2026-11-23T16:06:00.123456789Z hello world") == ("2026-11-23T16:06:00.123456789Z",
                                                                           "hello world")
    assert split_log_line("no timestamp here") == (None, "no timestamp here")
