"""The scale bench's own arithmetic (its figures go into the docs, so they are tested like product code)."""

from __future__ import annotations

from kubetune.api.events import MARKER

from bench.operator_scale import (
    counter_rates,
    counter_value,
    histogram_quantile,
    labelled_counters,
    log_progress,
    lost_final_states,
    max_rate,
    percentile,
    progress_lags,
    status_regressions,
)


def test_progress_lag_is_first_status_at_or_past_the_step_of_the_same_pod() -> None:
    logs = {"r": [("p1", 10.0, 1), ("p1", 10.5, 2), ("p1", 11.0, 3), ("p2", 20.0, 1)]}
    seen = {"r": [(9.0, "p1", 1), (10.8, "p1", 2), (12.0, "p1", 3), (20.1, "p1", 3), (21.0, "p2", 1)]}
    lags = progress_lags(seen, logs)
    # step 1 of p1: the 9.0 observation predates the event (a stale status), so 10.8 is the first one
    assert [round(x, 3) for x in lags] == [0.8, 0.3, 1.0, 1.0]
    assert progress_lags({}, logs) == []  # never seen: not counted as fast


def test_log_progress_reads_kubelet_timestamps_and_skips_other_lines() -> None:
    text = ("2026-11-23T10:00:00.500000000Z human line\n"
            f'2026-11-23T10:00:01.250000000Z {MARKER}{{"type": "progress", "step": 4, "total_steps": 9}}\n'
            f'2026-11-23T10:00:02Z {MARKER}{{"type": "metrics", "step": 4}}\n')
    events = log_progress(text)
    assert len(events) == 1 and events[0][1] == 4
    assert abs(events[0][0] % 60 - 1.25) < 1e-6


def test_percentile_and_histogram_bounds() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    exposition = ('x_bucket{le="0.5"} 10.0\nx_bucket{le="1.0"} 99.0\nx_bucket{le="3.0"} 100.0\n'
                  'x_bucket{le="+Inf"} 100.0\n')
    assert histogram_quantile(exposition, "x", 50) == (1.0, 100)
    assert histogram_quantile(exposition, "x", 99.5) == (3.0, 100)


def test_status_regressions_count_runs_whose_step_went_down_for_the_same_pod() -> None:
    seen = {"replayed": [(1.0, "p1", 5), (2.0, "p1", 7), (3.0, "p1", 2), (4.0, "p1", 8)],
            "retried": [(1.0, "p1", 5), (2.0, "p2", 3), (3.0, "p2", 4)],  # a new pod resumes lower: fine
            "steady": [(1.0, "p1", 1), (2.0, "p1", 1), (3.0, "p1", 2)]}
    assert status_regressions(seen) == 1


def test_max_rate_is_the_busiest_second_in_the_window() -> None:
    times = [100.1, 100.2, 100.9, 101.5, 103.0, 170.0]
    assert max_rate(times, 100.0, 60.0) == 3
    assert max_rate(times, 200.0, 60.0) == 0


def test_counter_rates_per_second_survive_a_process_restart() -> None:
    exposition = "# TYPE kubetune_status_patches_total counter\nkubetune_status_patches_total 42.0\n"
    assert counter_value(exposition, "kubetune_status_patches_total") == 42.0
    assert counter_value(exposition, "kubetune_missing_total") is None
    samples = [(0.0, 10.0), (1.0, 40.0), (3.0, 100.0), (4.0, 12.0), (5.0, 12.0)]  # reset between 3 and 4
    assert counter_rates(samples) == [(1.0, 30.0), (3.0, 30.0), (4.0, 12.0), (5.0, 0.0)]


def test_restart_bench_summarizes_each_figure_as_median_min_max() -> None:
    from bench.operator_restart import summarize

    repeats = [{"status_regressions": 3, "event_to_status_p99_s": 2.0}, {"status_regressions": 0},
               {"status_regressions": 1, "event_to_status_p99_s": 4.0}]
    summary = summarize(repeats)
    assert summary["status_regressions"] == {"median": 1, "min": 0, "max": 3}
    assert summary["event_to_status_p99_s"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert "duplicate_jobs" not in summary  # never measured: not reported as 0


def test_a_finished_run_missing_its_streams_last_step_or_artifact_is_a_lost_final_state() -> None:
    def run(name: str, **status: object) -> dict[str, object]:
        return {"metadata": {"name": name}, "status": status}

    items = [run("ok", phase="Succeeded", progress={"step": 9}, artifact={"uri": "s3://b/ok/"}),
             run("behind", phase="Succeeded", progress={"step": 8}, artifact={"uri": "s3://b/x/"}),
             run("no-artifact", phase="Succeeded", progress={"step": 9}),
             run("running", phase="Running", progress={"step": 3})]
    assert lost_final_states(items, 9) == ["behind", "no-artifact"]


def test_labelled_counters_by_label_set() -> None:
    text = ('# HELP x_total X\nx_total{code="2xx",verb="GET"} 5.0\nx_total{code="error",verb="STREAM"} 2.0\n'
            "x_created 1.0\n")
    assert labelled_counters(text, "x_total") == {'{code="2xx",verb="GET"}': 5.0, '{code="error",verb="STREAM"}': 2.0}
