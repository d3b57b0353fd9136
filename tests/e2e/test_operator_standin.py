"""The operator end to end with real pods: the stand-in trainer image (stdlib script printing the documented
event contract) runs as the Job; status shows progress, metrics and the log tail; retries, permanent
failures, suspend/resume and TTL behave as documented.

The e2e test with the real trainer image lives beside the trainer's own tests once that image exists.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION, GROUP, PLURAL, VERSION

from tests.integration.test_operator_support import (
    Runs,
    condition,
    crd_installed,
    operator,
    run_manifest,
    runs,
    standin,
    standin_image,
    wait_for,
)

__all__ = ["crd_installed", "operator", "runs", "standin_image"]

pytestmark = pytest.mark.e2e


def test_standin_run_succeeds_with_progress_metrics_and_log_tail(standin_image: str, operator: Any,
                                                                 runs: Runs) -> None:
    runs.create(run_manifest("ok", model=standin(steps=12, pace=0.4), training={"epochs": 3}))
    # While it runs, status shows progress and the log tail.
    running = wait_for(lambda: (s := runs.status("ok")).get("phase") == "Running"
                       and (s.get("progress") or {}).get("step", 0) >= 3 and s, 60, "progress while running")
    assert running["progress"]["totalSteps"] == 12
    assert running["progress"]["summary"]
    assert any(line.startswith("step ") for line in running["logTail"])
    assert running["podName"].startswith("ok-a1-")
    final = runs.wait_phase("ok", "Succeeded", 60)
    assert final["progress"]["percent"] == 100
    assert final["metrics"]["before"]["recall_at_k"] == 0.25 and final["metrics"]["after"]["recall_at_k"] == 0.75
    assert final["metrics"]["trainLoss"] > 0
    assert final["artifact"]["uri"].endswith(f"/{runs.namespace}/ok/")
    assert len(final["artifact"]["sha256"]) == 64
    assert final["logTail"][-1] == "stand-in trainer: done"
    assert final["attempts"] == 1 and condition(final, "Succeeded")["status"] == "True"
    assert final["completionTime"] >= final["startTime"]
    metrics = operator.metrics()
    assert f'kubetune_run_progress_ratio{{name="ok",namespace="{runs.namespace}"}} 1.0' in metrics
    assert "kubetune_status_lag_seconds_count" in metrics
    reasons = [e.reason for e in runs.events("ok")]
    assert "PodRunning" in reasons and "TrainingSucceeded" in reasons
    # A finished run's children are never re-created: delete the Job, nothing comes back.
    for job in runs.jobs("ok"):
        runs.batch.delete_namespaced_job(job.metadata.name, runs.namespace, propagation_policy="Background")
    time.sleep(4)
    assert [j for j in runs.jobs("ok") if not j.metadata.deletion_timestamp] == []
    assert runs.status("ok")["phase"] == "Succeeded"


def test_retryable_exit_retries_from_checkpoint(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("retry", model=standin(steps=6, pace=0.2, exit_code=75, fail_attempts=1,
                                                    fail_at_step=4), training={"epochs": 2}))
    final = runs.wait_phase("retry", "Succeeded", 90)
    assert final["attempts"] == 2 and final["retries"] == 1
    assert sorted(j.metadata.name for j in runs.jobs("retry")) == ["retry-a1", "retry-a2"]
    (job2,) = [j for j in runs.jobs("retry") if j.metadata.name == "retry-a2"]
    env = {e.name: e.value for e in job2.spec.template.spec.containers[0].env}
    assert env["KUBETUNE_ATTEMPT"] == "2"
    assert env["KUBETUNE_RESUME_FROM"].endswith("/checkpoints/step-3")  # the last checkpoint of attempt 1
    assert condition(final, "Restarting")["status"] == "False"
    assert "RetryableFailure" in [e.reason for e in runs.events("retry")]


def test_permanent_exit_fails_fast(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("bad", model=standin(steps=3, pace=0.1, exit_code=78)))
    final = runs.wait_phase("bad", "Failed", 60)
    assert final["attempts"] == 1
    failed = condition(final, "Failed")
    assert failed["reason"] == "StandInFailure" and "78" in failed["message"]
    time.sleep(3)
    assert len(runs.jobs("bad")) == 1


def test_backoff_limit_is_respected(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("flaky", model=standin(steps=2, pace=0.1, exit_code=75),
                             runPolicy={"backoffLimit": 1}))
    final = runs.wait_phase("flaky", "Failed", 90)
    assert final["attempts"] == 2
    assert condition(final, "Failed")["reason"] == "BackoffLimitExceeded"


def test_suspend_running_run_and_resume(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("sr", model=standin(steps=30, pace=0.3)))
    wait_for(lambda: (runs.status("sr").get("progress") or {}).get("step", 0) >= 3, 60, "some progress")
    runs.patch_spec("sr", {"runPolicy": {"suspend": True}})
    runs.wait_phase("sr", "Suspended", 30)
    wait_for(lambda: not [j for j in runs.jobs("sr") if not j.metadata.deletion_timestamp], 60, "the Job deleted")
    checkpoint = runs.status("sr").get("checkpoint")
    runs.patch_spec("sr", {"runPolicy": {"suspend": False}})
    final = runs.wait_phase("sr", "Succeeded", 120)
    assert final["attempts"] == 2 and not final.get("retries")
    (job2,) = [j for j in runs.jobs("sr") if j.metadata.name == "sr-a2"]
    env = {e.name: e.value for e in job2.spec.template.spec.containers[0].env}
    assert env.get("KUBETUNE_RESUME_FROM") == checkpoint


def test_cancel_running_run_is_terminal(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("cx", model=standin(steps=400, pace=0.3)))
    wait_for(lambda: (runs.status("cx").get("progress") or {}).get("step", 0) >= 2, 60, "some progress")
    runs.api.patch_namespaced_custom_object(GROUP, VERSION, runs.namespace, PLURAL, "cx", {"metadata": {
        "annotations": {CANCEL_ANNOTATION: "2026-01-02T03:04:05Z", CANCEL_BY_ANNOTATION: "e2e"}}})
    final = runs.wait_phase("cx", "Cancelled", 30)
    cond = condition(final, "Cancelled")
    assert cond["status"] == "True" and cond["reason"] == "Cancelled"
    assert "by e2e at 2026-01-02T03:04:05Z" in cond["message"]
    assert final["completionTime"] and condition(final, "Running")["status"] == "False"
    wait_for(lambda: not runs.jobs("cx"), 60, "the Job deleted")
    assert "Cancelled" in [e.reason for e in runs.events("cx")]
    # The trainer's SIGTERM exit (143, retryable) is no retry; suspend toggles and an operator restart
    # (on.resume) do not re-launch a cancelled run.
    runs.patch_spec("cx", {"runPolicy": {"suspend": True}})
    runs.patch_spec("cx", {"runPolicy": {"suspend": False}})
    operator.stop()
    operator.start()
    time.sleep(5)
    status = runs.status("cx")
    assert status["phase"] == "Cancelled" and status["attempts"] == 1 and not status.get("retries"), status
    assert runs.jobs("cx") == []
    assert "RetryableFailure" not in [e.reason for e in runs.events("cx")]


def test_ttl_after_finished_deletes_children_keeps_run(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("ttl", model=standin(steps=2, pace=0.1), runPolicy={"ttlSecondsAfterFinished": 1}))
    runs.wait_phase("ttl", "Succeeded", 60)
    status = wait_for(lambda: condition(s := runs.status("ttl"), "CleanedUp").get("status") == "True" and s, 30,
                      "the TTL cleanup")
    assert status["phase"] == "Succeeded" and status["artifact"]
    wait_for(lambda: not [j for j in runs.jobs("ttl") if not j.metadata.deletion_timestamp], 30, "Jobs gone")
    assert runs.config_maps("ttl") == []
