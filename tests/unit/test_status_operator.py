"""Pure parts of the operator package: spec validation with field paths, metric names, the Job/pod index,
the status-patch token bucket, and kopf settings."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf
import pytest
from kubetune.api.validation import format_errors, validate_spec
from kubetune.operator.context import ChildIndex, TokenBucket
from kubetune.operator.handlers import FINALIZER, QuietWatchHandlers, configure_kopf
from kubetune.operator.kube import split_log_line
from kubetune.operator.metrics import Metrics

pytestmark = pytest.mark.unit


def test_validate_reports_field_and_cross_field_paths() -> None:
    model, errors = validate_spec({"data": {"train": "s3://b/t.csv"}})
    assert model is not None and errors == []
    _, errors = validate_spec({"data": {"train": "s3://b/t.csv", "eval": "s3://b/e.csv", "valSplit": 0.2},
                          "training": {"lockImage": True, "lockText": True}})
    paths = [p for p, _ in errors]
    assert paths == ["spec.data.valSplit", "spec.training.lockText"]
    _, errors = validate_spec({"data": {"train": ""}, "training": {"epochs": 0}})
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
        index.on_pod("DELETED", _pod("p2", 2, "Pending", "2026-01-01T00:01:00Z"))
        assert index.pod(("ns", "r"), 2).name == "p3"  # type: ignore[union-attr]
        index.on_pod("ADDED", _pod("p4", 2, "Pending", "2026-01-01T00:00:30Z"))
        index.on_pod("DELETED", _pod("p3", 2, "Succeeded", "2026-01-01T00:02:00Z",
                                     {"name": "trainer", "state": {"terminated": {
                                         "exitCode": 0, "message": "KUBETUNE_EVENT {}"}}}))
        assert index.pod(("ns", "r"), 2).name == "p4"  # type: ignore[union-attr]  # existing pods first
        index.on_pod("DELETED", _pod("p4", 2, "Pending", "2026-01-01T00:00:30Z"))
        gone = index.pod(("ns", "r"), 2)  # a removed pod's last state stays: its summary decides the attempt
        assert gone is not None and gone.gone and gone.succeeded and gone.message == "KUBETUNE_EVENT {}"
        assert [p.name for _, p in index.pods(("ns", "r")) if p.alive] == []
        index.on_pod("ADDED", _pod("p5", 2, "Pending", "2026-01-01T00:03:00Z"))  # a pod started after p3 ended
        assert index.pod(("ns", "r"), 2).name == "p5"  # type: ignore[union-attr]
        assert index.ended_pod(("ns", "r"), 2) == gone  # the one that ended keeps the result
        index.on_job("ADDED", {"metadata": {"name": "r-a1", "namespace": "ns", "labels": {"kubetune.io/run": "r"}},
                               "status": {"conditions": [{"type": "Failed", "status": "True"}]}})
        assert index.job("ns", "r-a1").failed  # type: ignore[union-attr]
        index.on_pod("ADDED", {"metadata": {"name": "other", "namespace": "ns"}})  # unlabelled: ignored
        index.forget_run(("ns", "r"))
        assert index.pod(("ns", "r"), 2) is None

    asyncio.run(scenario())


def test_child_index_resync_replaces_what_a_missed_event_left_stale() -> None:
    async def scenario() -> None:
        index = ChildIndex()
        key = ("ns", "r")
        changed = index.register(key)
        index.on_pod("ADDED", _pod("p1", 1, "Pending", "2026-01-01T00:00:00Z"))  # then its events were missed
        job = {"metadata": {"name": "r-a1", "namespace": "ns", "labels": {"kubetune.io/run": "r"}},
               "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
        exited = _pod("p1", 1, "Failed", "2026-01-01T00:00:00Z",
                      {"name": "trainer", "state": {"terminated": {"exitCode": 78}}})
        changed.clear()
        index.resync(key, "r-a1", job, [exited, {"metadata": {"name": "x", "namespace": "other"}}])
        pod = index.pod(key, 1)
        assert changed.is_set() and pod is not None and pod.exit_code == 78
        assert index.job("ns", "r-a1").failed  # type: ignore[union-attr]
        index.resync(key, "r-a1", None, [])  # both gone meanwhile: the pod's last state stays, as gone
        gone = index.pod(key, 1)
        assert gone is not None and gone.gone and gone.exit_code == 78 and index.job("ns", "r-a1") is None
        assert index.ended_pod(key, 1) == gone and index.pod_named(key, "p1") == gone

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
    configure_kopf(settings, instance="test")
    assert settings.persistence.finalizer == FINALIZER == "kubetune.io/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.peering.standalone is True  # the Lease election decides which replica runs kopf
    assert settings.posting.reporting_component == "kubetune-operator"


def test_split_log_line() -> None:
    assert split_log_line("2026-11-23T16:06:00.123456789Z hello world") == ("2026-11-23T16:06:00.123456789Z",
                                                                           "hello world")
    assert split_log_line("no timestamp here") == (None, "no timestamp here")


RICH_STATUS = {"phase": "Running",
               "progress": {"percent": 50.0, "samplesPerSecond": 12.5, "etaSeconds": 42.0},
               "metrics": {"trainLoss": 1.25, "valLoss": 1.5, "before": {"recall_at_k": 0.25, "mrr": 0.1},
                           "after": {"recall_at_k": 0.75, "mrr": 0.5}}}


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.exposition().decode()) for s in family.samples}


def test_per_run_series_info_eta_val_loss_evaluation_and_forget() -> None:
    m = Metrics()
    m.table.update("ns", "a", RICH_STATUS, model="ViT-B-16")
    m.table.update("ns", "b", {"phase": "Failed"})
    s = _samples(m)
    run_a = (("name", "a"), ("namespace", "ns"))
    assert s[("kubetune_run_info", (("model", "ViT-B-16"), ("name", "a"), ("namespace", "ns"),
                                    ("phase", "Running")))] == 1.0
    # no model known: the spec's default model name
    assert s[("kubetune_run_info", (("model", "ViT-B-32"), ("name", "b"), ("namespace", "ns"),
                                    ("phase", "Failed")))] == 1.0
    assert s[("kubetune_run_eta_seconds", run_a)] == 42.0
    assert s[("kubetune_run_val_loss", run_a)] == 1.5
    assert s[("kubetune_run_progress_ratio", run_a)] == 0.5
    for stage, values in (("before", {"recall_at_k": 0.25, "mrr": 0.1}), ("after", {"recall_at_k": 0.75, "mrr": 0.5})):
        for metric, value in values.items():
            assert s[("kubetune_run_evaluation", (("metric", metric), ("name", "a"), ("namespace", "ns"),
                                                  ("stage", stage)))] == value
    assert not any(k[0] == "kubetune_run_eta_seconds" and ("name", "b") in k[1] for k in s)
    # A status-only update (the supervisor's) keeps the model; a phase change replaces the info series.
    m.table.update("ns", "a", {**RICH_STATUS, "phase": "Succeeded"})
    infos = [k for k in _samples(m) if k[0] == "kubetune_run_info" and ("name", "a") in k[1]]
    assert infos == [("kubetune_run_info", (("model", "ViT-B-16"), ("name", "a"), ("namespace", "ns"),
                                            ("phase", "Succeeded")))]
    # Deleting a run removes every series naming it (bounded cardinality).
    m.table.forget("ns", "a")
    m.table.forget("ns", "b")
    assert not [k for k in _samples(m) if ("namespace", "ns") in k[1]]


def test_errors_and_transitions_start_at_zero() -> None:
    from kubetune.operator.metrics import HANDLERS, PHASES, possible_transitions

    m = Metrics()
    s = _samples(m)
    for handler in HANDLERS:
        assert s[("kubetune_reconcile_errors_total", (("handler", handler),))] == 0.0
    for phase in PHASES:  # every phase can be reached, and its first transition is seen by increase()
        assert any(k[0] == "kubetune_run_transitions_total" and ("to_phase", phase) in k[1] and v == 0.0
                   for k, v in s.items())
    assert s[("kubetune_run_transitions_total", (("from_phase", "Running"), ("to_phase", "Failed")))] == 0.0
    assert ("None", "Failed") in possible_transitions() and ("Succeeded", "Running") not in possible_transitions()
    assert all(a != b for a, b in possible_transitions())
    with pytest.raises(RuntimeError), m.timed("update"):
        raise RuntimeError("boom")
    with pytest.raises(ValueError), m.counting_errors("supervisor"):
        raise ValueError("boom")

    async def cancelled() -> None:
        with m.counting_errors("supervisor"):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    m.transition("Running", "Failed")
    s = _samples(m)
    assert s[("kubetune_reconcile_errors_total", (("handler", "update"),))] == 1.0
    assert s[("kubetune_reconcile_errors_total", (("handler", "supervisor"),))] == 1.0  # cancellation is no error
    assert s[("kubetune_reconcile_duration_seconds_count", (("handler", "update"),))] == 1.0
    assert s[("kubetune_run_transitions_total", (("from_phase", "Running"), ("to_phase", "Failed")))] == 1.0


def test_process_metrics_on_the_operator_registry() -> None:
    names = {k[0] for k in _samples(Metrics())}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names


def test_promtool_check_metrics_is_clean() -> None:
    """Debian's promtool lints the operator's exposition (every family present, per-run ones included)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    m = Metrics()
    m.table.update("ns", "a", RICH_STATUS, model="ViT-B-32")
    m.transition(None, "Pending")
    with m.timed("accept"):
        pass
    m.observe_lag([time.time() - 0.5], time.time())
    m.jobs_created.labels(reason="initial").inc()
    m.trainer_events.labels(type="progress").inc()
    m.status_patches.inc()
    m.info.labels(version="0.1.0", kubernetes="v1.20.2").set(1)
    check = subprocess.run([promtool, "check", "metrics"], input=m.exposition(), capture_output=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout.decode() + check.stderr.decode())


def test_in_cluster_login_uses_service_env_not_dns(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.operator import handlers

    assert handlers.in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}) \
        == "https://10.96.0.1:443"
    assert handlers.in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) == "https://10.96.0.1:443"
    assert handlers.in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}) \
        == "https://[fd00::1]:6443"
    assert handlers.in_cluster_server({}) is None
    kopf_info = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="t", ca_path="/ca.crt",
                                    default_namespace="ops")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: kopf_info)
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: "kubeconfig")
    token = tmp_path / "token"
    token.write_text("t")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    info = handlers.connection_info(env=env, token_path=str(token))
    assert info.server == "https://10.96.0.1:443"
    assert (info.token, info.ca_path, info.default_namespace) == ("t", "/ca.crt", "ops")
    assert handlers.connection_info(env={}, token_path=str(token)) is kopf_info  # no variables: kopf's own URL
    assert handlers.connection_info(env=env, token_path=str(tmp_path / "missing")) == "kubeconfig"  # not in a pod


def test_quiet_watch_handlers_drops_only_the_watch_handlers_success_lines() -> None:
    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    quiet = QuietWatchHandlers()
    assert not quiet.filter(record(logging.INFO, "Handler 'pod_event' succeeded."))
    assert not quiet.filter(record(logging.INFO, "Handler 'run_event' succeeded."))
    assert quiet.filter(record(logging.INFO, "Handler 'accept' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Handler 'pod_event' failed with an exception."))


def test_kube_errors_tell_a_missing_object_from_a_transient_answer() -> None:
    from kubetune.operator.kube import _error

    gone = _error(404, '{"kind": "Status", "reason": "NotFound", "message": "pods \\"p\\" not found", '
                       '"details": {"name": "p", "kind": "pods"}, "code": 404}')
    assert gone.object_name == "p" and not gone.transient
    unknown = _error(404, '{"kind": "Status", "reason": "NotFound", "details": {}, '
                          '"message": "the server could not find the requested resource", "code": 404}')
    assert unknown.object_name is None and unknown.transient
    assert _error(503, "service unavailable").transient and not _error(422, "{}").transient
    assert _error(404, "404 page not found").transient  # not even a Status: not about an object
