"""The operator against a real API server: CRD, schema rejections, children, status, events, lifecycle.

Pods are not needed here (Jobs are created; whether they run is the e2e tests' business), but they may run
when the harness can: the stand-in image is not required, a missing image just leaves the pod waiting.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.test_operator_support import (
    Runs,
    condition,
    crd_installed,
    kubectl,
    operator,
    run_manifest,
    runs,
    standin,
    wait_for,
)

__all__ = ["crd_installed", "operator", "runs"]  # fixtures re-exported for pytest

pytestmark = pytest.mark.integration


def test_schema_rejects_bad_specs_with_field_paths(cluster: Any, crd_installed: str, namespace: str) -> None:
    bad = run_manifest("bad", training={"epochs": 0, "precision": "fp8"}, data={"valSplit": 0.9})
    proc = kubectl(cluster.kubeconfig, "-n", namespace, "apply", "--validate=false", "-f", "-", input=json.dumps(bad),
                   check=False)  # the API server validates, not kubectl
    assert proc.returncode != 0
    for path in ("spec.training.epochs", "spec.training.precision", "spec.data.valSplit", "spec.data.train"):
        assert path in proc.stderr, proc.stderr
    explain = kubectl(cluster.kubeconfig, "explain", "finetunerun.spec.training.learningRate")
    assert "Peak learning rate" in explain.stdout


def test_run_gets_a_job_owned_by_it_carrying_its_config(cluster: Any, operator: Any, runs: Runs,
                                                        namespace: str) -> None:
    manifest = run_manifest("r1", model=standin(steps=50, pace=0.5), queueName="team-queue")
    kubectl(cluster.kubeconfig, "-n", namespace, "apply", "-f", "-", input=json.dumps(manifest))
    t0 = time.monotonic()
    (job,) = wait_for(lambda: runs.jobs("r1"), 20, "the run's Job")
    apply_to_job = time.monotonic() - t0
    run = runs.get("r1")
    assert run is not None
    uid = run["metadata"]["uid"]
    assert job.metadata.name == "r1-a1"
    (ref,) = job.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid, ref.controller) == ("FinetuneRun", "r1", uid, True)
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-queue"
    assert job.spec.backoff_limit == 0
    pod_spec = job.spec.template.spec
    assert pod_spec.automount_service_account_token is False
    assert pod_spec.containers[0].security_context.read_only_root_filesystem is True
    assert runs.config_maps("r1") == []  # the run config travels in the Job: the operator has no ConfigMap rights
    config = json.loads(job.spec.template.metadata.annotations["kubetune.io/run-config"])
    assert config["metadata"]["uid"] == uid and config["spec"]["model"]["config"]["standin"]["steps"] == 50
    status = wait_for(lambda: (s := runs.status("r1")).get("jobName")
                      and condition(s, "Created").get("status") == "True" and s, 20, "status with the Job")
    assert status["attempts"] == 1 and status["jobName"] == "r1-a1"
    assert status["phase"] in {"Pending", "Running"}
    assert status["observedGeneration"] == 1
    reasons = wait_for(lambda: {e.reason for e in runs.events("r1")} >= {"JobCreated", "QueueUnsupported"} and
                       {e.reason for e in runs.events("r1")}, 15, "JobCreated and QueueUnsupported events")
    assert "JobCreated" in reasons
    table = kubectl(cluster.kubeconfig, "-n", namespace, "get", "ftr", "-o", "wide").stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "AGE"] and "ARTIFACT" in header
    assert "ViT-B-32" in table
    assert apply_to_job < 5.0, apply_to_job
    metrics = operator.metrics()
    assert 'kubetune_jobs_created_total{reason="initial"} 1.0' in metrics
    assert "kubetune_runs{phase=" in metrics

    # Delete cascades: the finalizer is released, the run and its Jobs go away.
    runs.delete("r1")
    wait_for(lambda: runs.get("r1") is None, 30, "the run to be deleted")
    wait_for(lambda: not [j for j in runs.jobs("r1") if not j.metadata.deletion_timestamp], 30, "Jobs deleted")


def test_cross_field_error_gives_condition_event_and_no_job(operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("invalid", data={"train": "s3://d/t.csv", "eval": "s3://d/e.csv", "valSplit": 0.2}))
    status = runs.wait_phase("invalid", "Failed", 20)
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.data.valSplit" in failed["message"]
    wait_for(lambda: any(e.reason == "InvalidSpec" and e.type == "Warning" and "spec.data.valSplit" in e.message
                         for e in runs.events("invalid")), 15, "an InvalidSpec Warning event")
    time.sleep(2)
    assert runs.jobs("invalid") == []
    assert runs.config_maps("invalid") == []


def test_created_suspended_then_resumed(operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("sus", model=standin(steps=50, pace=0.5), runPolicy={"suspend": True}))
    status = runs.wait_phase("sus", "Suspended", 20)
    assert condition(status, "Suspended")["status"] == "True"
    time.sleep(2)
    assert runs.jobs("sus") == []
    runs.patch_spec("sus", {"runPolicy": {"suspend": False}})
    (job,) = wait_for(lambda: runs.jobs("sus"), 20, "a Job after resuming")
    assert job.metadata.name == "sus-a1"
    status = wait_for(lambda: (s := runs.status("sus")).get("phase") in {"Pending", "Running"} and s, 20,
                      "the run to leave Suspended")
    assert condition(status, "Suspended")["status"] == "False"
    # Suspend again: the Job is deleted and the run waits.
    runs.patch_spec("sus", {"runPolicy": {"suspend": True}})
    runs.wait_phase("sus", "Suspended", 20)
    wait_for(lambda: not [j for j in runs.jobs("sus") if not j.metadata.deletion_timestamp], 30, "the Job deleted")


def test_operator_restart_creates_no_duplicate_jobs(cluster: Any, operator: Any, runs: Runs) -> None:
    for i in range(3):
        runs.create(run_manifest(f"idem{i}", model=standin(steps=100, pace=1.0)))
    wait_for(lambda: len(runs.jobs()) >= 3, 30, "three Jobs")
    operator.stop()
    operator.start()
    time.sleep(5)
    operator.stop()
    operator.start()
    time.sleep(5)
    names = sorted(j.metadata.name for j in runs.jobs())
    assert names == ["idem0-a1", "idem1-a1", "idem2-a1"], names
    for i in range(3):
        assert runs.status(f"idem{i}").get("attempts") == 1
