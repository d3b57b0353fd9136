"""The operator's per-run series: how long they live, when a run's phase and progress began (for the alerts), its
trainer pod (for the GPU dashboard), and the lag histograms' range. Driven on a simulated clock."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.lifecycle.conditions import transition
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.operator.metrics import FINISHED_RUN_SECONDS, MAX_FINISHED_RUNS, Metrics, phase_start_time
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.exposition().decode()) for s in family.samples}


def of_run(m: Metrics, name: str) -> dict[str, float]:
    """The run's series by metric name (the last one when a family has several)."""
    return {metric: value for (metric, labels), value in samples(m).items() if ("name", name) in labels}


def runs_by_phase(m: Metrics) -> dict[str, float]:
    return {dict(labels)["phase"]: v for (metric, labels), v in samples(m).items() if metric == "kubetune_runs"}


RICH = {"progress": {"step": 3, "percent": 30.0, "samplesPerSecond": 10.0, "etaSeconds": 60.0},
        "metrics": {"trainLoss": 1.0, "valLoss": 1.1, "before": {f"m{i}": 0.1 for i in range(64)},
                    "after": {f"m{i}": 0.2 for i in range(64)}}}


def finished(status: dict[str, Any], phase: str, at: float) -> dict[str, Any]:
    return {**status, **transition(status, phase, "Done", "done", at)}


def test_a_finished_runs_series_go_after_the_retention_but_it_is_still_counted() -> None:
    clock = Clock()
    m = Metrics(clock)
    running = {**transition({}, "Running", "PodRunning", "", T0), **RICH, "podName": "a-a1-x7k2p"}
    m.table.update("ns", "a", running)
    assert sum(("name", "a") in labels for _, labels in samples(m)) > 130  # what piled up per finished run
    m.table.update("ns", "a", finished(running, "Succeeded", T0 + 60))
    clock.now = T0 + 60 + FINISHED_RUN_SECONDS - 1
    assert of_run(m, "a")["kubetune_run_progress_ratio"] == 0.3  # Prometheus still sees its final values
    clock.now = T0 + 60 + FINISHED_RUN_SECONDS + 1
    assert of_run(m, "a") == {}
    assert runs_by_phase(m)["Succeeded"] == 1


def test_only_the_most_recently_finished_runs_keep_their_series() -> None:
    clock = Clock()
    m = Metrics(clock)
    for i in range(MAX_FINISHED_RUNS + 5):
        m.table.update("ns", f"r{i}", finished({"phase": "Running"}, "Failed", T0 + i))
    m.table.update("ns", "active", {"phase": "Pending"})
    clock.now = T0 + MAX_FINISHED_RUNS + 5
    exported = {dict(labels)["name"] for (metric, labels) in samples(m) if metric == "kubetune_run_info"}
    assert exported == {"active"} | {f"r{i}" for i in range(5, MAX_FINISHED_RUNS + 5)}
    assert runs_by_phase(m)["Failed"] == MAX_FINISHED_RUNS + 5


def test_a_finished_run_seen_after_a_restart_is_dated_by_its_completion_time() -> None:
    clock = Clock()
    m = Metrics(clock)
    m.table.update("ns", "old", finished({"phase": "Running"}, "Succeeded", T0 - FINISHED_RUN_SECONDS - 60))
    assert of_run(m, "old") == {}


def test_phase_start_comes_from_the_status_so_a_restart_keeps_it() -> None:
    created = T0 - 3600
    assert phase_start_time({"phase": "Pending"}, created) == created
    running = transition({}, "Running", "PodRunning", "", T0 - 1800)
    assert phase_start_time(running, created) == T0 - 1800
    # A retry goes back to Pending: it began when Running ended.
    retrying = {**running, **transition(running, "Pending", "Retrying", "", T0 - 600)}
    assert phase_start_time(retrying, created) == T0 - 600
    assert phase_start_time({"phase": "Pending"}, None) is None
    # A new operator process (empty table) exports the same start for a run it sees for the first time.
    clock = Clock()
    m = Metrics(clock)
    m.table.update("ns", "waits", {"phase": "Pending"}, created=now_rfc3339(created))
    assert samples(m)[("kubetune_run_phase_start_time_seconds",
                       (("name", "waits"), ("namespace", "ns"), ("phase", "Pending")))] == created
    # A status-only update (the supervisor's) keeps the creation time.
    clock.now += 30
    m.table.update("ns", "waits", {"phase": "Pending", "message": "waiting for a GPU"})
    assert of_run(m, "waits")["kubetune_run_phase_start_time_seconds"] == created


def test_without_a_dated_status_the_phase_starts_when_this_process_sees_it() -> None:
    clock = Clock()
    m = Metrics(clock)
    m.table.update("ns", "a", {"phase": "Suspended"})
    clock.now += 100
    m.table.update("ns", "a", {"phase": "Suspended"})
    assert of_run(m, "a")["kubetune_run_phase_start_time_seconds"] == T0


def test_last_progress_time_moves_with_the_step_and_exists_while_running() -> None:
    clock = Clock()
    m = Metrics(clock)
    m.table.update("ns", "a", {"phase": "Pending"})
    assert "kubetune_run_last_progress_time_seconds" not in of_run(m, "a")
    clock.now = T0 + 10
    m.table.update("ns", "a", {"phase": "Running"})
    assert of_run(m, "a")["kubetune_run_last_progress_time_seconds"] == T0 + 10  # started Running
    clock.now = T0 + 20
    m.table.update("ns", "a", {"phase": "Running", "progress": {"step": 1}})
    clock.now = T0 + 500
    m.table.update("ns", "a", {"phase": "Running", "progress": {"step": 1}, "message": "still step 1"})
    assert of_run(m, "a")["kubetune_run_last_progress_time_seconds"] == T0 + 20
    clock.now = T0 + 600
    m.table.update("ns", "a", {"phase": "Running", "progress": {"step": 2}})
    assert of_run(m, "a")["kubetune_run_last_progress_time_seconds"] == T0 + 600
    m.table.update("ns", "a", finished({"phase": "Running"}, "Succeeded", T0 + 601))
    assert "kubetune_run_last_progress_time_seconds" not in of_run(m, "a")


def test_the_trainer_pod_of_a_run_with_a_long_name() -> None:
    from kubetune.api.names import job_name, run_label

    name = "clip-finetune-" + "x" * 56  # 70 characters: pod names and the run label are shortened
    pod = f"{job_name(name, 1)}-x7k2p"
    assert run_label(name) != name and not pod.startswith(name)
    m = Metrics(Clock())
    m.table.update("team-a", name, {"phase": "Running", "podName": pod})
    assert samples(m)[("kubetune_run_pod_info", (("name", name), ("namespace", "team-a"), ("pod", pod)))] == 1.0


def test_lag_histograms_reach_ten_minutes() -> None:
    """A contended API server delayed log lines by over two minutes; those lags stay measurable."""
    m = Metrics(Clock())
    m.observe_lag([T0 - 141], T0)
    m.log_delivery.observe(141)
    s = samples(m)
    for family in ("kubetune_status_lag_seconds_bucket", "kubetune_log_delivery_seconds_bucket"):
        assert s[(family, (("le", "120.0"),))] == 0 and s[(family, (("le", "300.0"),))] == 1
        assert (family, (("le", "600.0"),)) in s
