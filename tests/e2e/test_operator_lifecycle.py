"""The run lifecycle's rules on the harness cluster with real pods (the stand-in trainer image): spec edits
during a run, refused Job creates, never two trainers of one run, the result from the termination message.

The rules themselves are pure (:mod:`kubetune.lifecycle.attempts`, table-tested in the unit suite); these
tests show that the operator carries them out against the real API server and Job controller.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubetune.api.events import parse_termination_message

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


def _config(runs: Runs, job_name: str) -> dict[str, Any]:
    """The run config an attempt's pod reads: its Job's pod template annotation (downward API volume)."""
    (job,) = [j for j in runs.jobs() if j.metadata.name == job_name]
    return dict(json.loads(job.spec.template.metadata.annotations["kubetune.io/run-config"]))


def _reasons(runs: Runs, name: str) -> list[str]:
    return [e.reason for e in runs.events(name)]


def test_invalid_spec_edit_mid_run_is_reported_and_the_run_stays_supervised(standin_image: str, operator: Any,
                                                                            runs: Runs) -> None:
    runs.create(run_manifest("edit-bad", model=standin(steps=16, pace=0.4),
                             data={"train": "s3://data/train.csv", "eval": "s3://data/eval.csv"}))
    wait_for(lambda: (runs.status("edit-bad").get("progress") or {}).get("step", 0) >= 2, 90, "progress")
    runs.patch_spec("edit-bad", {"data": {"valSplit": 0.1}})  # beside eval data: a cross-field error
    invalid = wait_for(lambda: (c := condition(runs.status("edit-bad"), "SpecValid")) and c["status"] == "False"
                       and c, 30, "the SpecValid=False condition")
    assert invalid["reason"] == "InvalidSpecUpdate" and "spec.data.valSplit" in invalid["message"]
    wait_for(lambda: "InvalidSpecUpdate" in _reasons(runs, "edit-bad"), 30, "the InvalidSpecUpdate Event")
    final = runs.wait_phase("edit-bad", "Succeeded", 120)  # supervised to the end: its result is mirrored
    assert final["attempts"] == 1 and final["attemptGeneration"] == 1
    assert final["progress"]["percent"] == 100 and final["artifact"]["uri"]


def test_spec_edit_applies_from_the_next_attempt_only(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("edit-ok", model=standin(steps=14, pace=0.4, exit_code=75, fail_attempts=1,
                                                      fail_at_step=8)))
    wait_for(lambda: (runs.status("edit-ok").get("progress") or {}).get("step", 0) >= 2, 90, "progress")
    runs.patch_spec("edit-ok", {"training": {"learningRate": 2e-6}})
    wait_for(lambda: (c := condition(runs.status("edit-ok"), "SpecValid")) and c["status"] == "True", 30,
             "the edit accepted")
    during = runs.status("edit-ok")
    # The running attempt keeps its spec: the config in its Job's (immutable) pod template still says generation 1.
    assert during["attempts"] == 1 and during["attemptGeneration"] == 1
    assert _config(runs, "edit-ok-a1")["metadata"]["generation"] == 1
    final = runs.wait_phase("edit-ok", "Succeeded", 150)
    assert final["attempts"] == 2 and final["attemptGeneration"] == 2
    doc = _config(runs, "edit-ok-a2")
    assert doc["metadata"]["generation"] == 2 and doc["spec"]["training"]["learningRate"] == 2e-6


def test_refused_job_create_becomes_a_condition_and_an_event_then_is_retried(standin_image: str, operator: Any,
                                                                            runs: Runs) -> None:
    from kubernetes import client

    quota = client.V1ResourceQuota(metadata=client.V1ObjectMeta(name="no-jobs"),
                                   spec=client.V1ResourceQuotaSpec(hard={"count/jobs.batch": "0"}))
    runs.core.create_namespaced_resource_quota(runs.namespace, quota)

    def enforced() -> bool:
        status = runs.core.read_namespaced_resource_quota("no-jobs", runs.namespace).status
        return status is not None and bool(status.hard)

    wait_for(enforced, 30, "the quota to be enforced")
    runs.create(run_manifest("refused", model=standin(steps=3, pace=0.1)))
    refused = wait_for(lambda: (c := condition(runs.status("refused"), "JobCreateFailed")) and c["status"] == "True"
                       and c, 60, "the JobCreateFailed condition")
    assert "quota" in refused["message"] and "refused-a1" in refused["message"]
    assert runs.jobs("refused") == []
    wait_for(lambda: "JobCreateFailed" in _reasons(runs, "refused"), 30, "the JobCreateFailed Event")
    assert runs.status("refused")["phase"] == "Pending"
    runs.core.delete_namespaced_resource_quota("no-jobs", runs.namespace)
    final = runs.wait_phase("refused", "Succeeded", 120)  # retried with backoff once the quota is gone
    assert final["attempts"] == 1 and condition(final, "JobCreateFailed")["status"] == "False"
    assert [j.metadata.name for j in runs.jobs("refused")] == ["refused-a1"]


class PodHistory:
    """Every pod of the namespace as a watch saw it, including ones deleted since: when each was created and
    when its trainer container finished (the test must see pods that exist only for seconds)."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.created: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            for event in watch.Watch().stream(self.runs.core.list_namespaced_pod, self.runs.namespace,
                                              timeout_seconds=2):
                pod: Any = event["object"]
                self.created.setdefault(pod.metadata.name, pod.metadata.creation_timestamp.timestamp())
                for cs in pod.status.container_statuses or []:
                    if cs.state.terminated is not None and cs.state.terminated.finished_at is not None:
                        self.finished[pod.metadata.name] = cs.state.terminated.finished_at.timestamp()
                if self.stop.is_set():
                    return


@pytest.fixture
def pod_history(runs: Runs) -> Iterator[PodHistory]:
    history = PodHistory(runs)
    history.thread.start()
    yield history
    history.stop.set()
    history.thread.join(timeout=10)


def test_next_attempt_starts_only_after_the_previous_trainer_has_stopped(standin_image: str, operator: Any,
                                                                        runs: Runs, pod_history: PodHistory) -> None:
    runs.create(run_manifest("overlap", model=standin(steps=24, pace=0.3, term_delay=8)))
    wait_for(lambda: (runs.status("overlap").get("progress") or {}).get("step", 0) >= 2, 90, "progress")
    runs.patch_spec("overlap", {"runPolicy": {"suspend": True}})
    runs.wait_phase("overlap", "Suspended", 30)
    runs.patch_spec("overlap", {"runPolicy": {"suspend": False}})  # at once: attempt 1 is still checkpointing
    wait_for(lambda: "Waiting for pod(s) overlap-a1-" in (runs.status("overlap").get("message") or ""), 30,
             "the next attempt waiting for attempt 1's pod")
    final = runs.wait_phase("overlap", "Succeeded", 180)
    assert final["attempts"] == 2
    first = [n for n in pod_history.created if n.startswith("overlap-a1-")]
    second = [n for n in pod_history.created if n.startswith("overlap-a2-")]
    assert len(first) == 1 and len(second) == 1, pod_history.created
    # Kubernetes timestamps have whole seconds: the second trainer was created no earlier than the first ended.
    assert pod_history.created[second[0]] >= pod_history.finished[first[0]], (pod_history.created,
                                                                             pod_history.finished)


def test_result_comes_from_the_termination_message_when_the_log_misses_it(standin_image: str, operator: Any,
                                                                         runs: Runs) -> None:
    # quiet_end: the after-evaluation, artifact and finished events never reach the log, only the message.
    runs.create(run_manifest("summary", model=standin(steps=4, pace=0.2, quiet_end=True)))

    def ended() -> tuple[str, str] | None:
        pods: list[Any] = runs.core.list_namespaced_pod(runs.namespace, label_selector="kubetune.io/run=summary").items
        for pod in pods:
            for cs in pod.status.container_statuses or []:
                if cs.state.terminated is not None:
                    return pod.metadata.name, cs.state.terminated.message or ""
        return None

    pod_name, message = wait_for(ended, 90, "the trainer to end", interval=0.05)
    runs.core.delete_namespaced_pod(pod_name, runs.namespace, grace_period_seconds=0)  # removed at once
    assert [e.type for e in parse_termination_message(message)] == ["evaluation", "artifact", "finished"]
    final = runs.wait_phase("summary", "Succeeded", 60)
    assert "artifact" in final, final
    assert final["artifact"]["uri"].endswith(f"/{runs.namespace}/summary/") and final["artifact"]["sha256"] == "0" * 64
    assert final["metrics"]["after"] == {"R@5": 0.75}  # the message keeps the key metrics only
    assert final["progress"]["percent"] == 100
    assert not any("KUBETUNE_EVENT" in line for line in final["logTail"])


def _started(runs: Runs, pods: list[str]) -> bool:
    """Every pod's trainer container is running."""
    statuses = [runs.core.read_namespaced_pod(pod, runs.namespace).status.container_statuses for pod in pods]
    return all(containers and all(c.state.running is not None for c in containers) for containers in statuses)


def _alive(runs: Runs, name: str) -> list[str]:
    pods = runs.core.list_namespaced_pod(runs.namespace, label_selector=f"kubetune.io/run={name}").items
    return [p.metadata.name for p in pods if p.status.phase in ("Pending", "Running")]


def test_pods_of_one_unit_that_cannot_all_be_scheduled_fail_the_run_in_time(standin_image: str, operator: Any,
                                                                              runs: Runs) -> None:
    # each pod asks for 1.5 of the node's 2 CPUs: rank 0 is placed, rank 1 never
    runs.create(run_manifest("too-big", model=standin(steps=400, pace=0.5),
                             resources={"gpus": 0, "cpu": "1500m", "memory": "64Mi", "nodes": 2},
                             runPolicy={"schedulingTimeoutSeconds": 8}))
    final = runs.wait_phase("too-big", "Failed", 90)
    assert condition(final, "Failed")["reason"] == "SchedulingTimeout", final
    assert "1 of 2 pods" in final["message"] and "Insufficient cpu" in final["message"], final["message"]
    wait_for(lambda: not _alive(runs, "too-big"), 120, "every pod of the unit to stop")
    assert not [j.metadata.name for j in runs.jobs("too-big") if (j.status.active or 0) > 0]


def test_suspending_a_run_over_several_pods_stops_every_pod(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("pair", model=standin(steps=400, pace=0.5),
                             resources={"gpus": 0, "cpu": "50m", "memory": "64Mi", "nodes": 2}))
    pods = wait_for(lambda: (p := runs.status("pair").get("pods")) and all(p) and p, 60, "both pods")
    assert sorted(j.metadata.name for j in runs.jobs("pair")) == ["pair-a1", "pair-a1-n1"]
    # both trainers started (a process still starting up as PID 1 ignores SIGTERM until its grace period ends)
    wait_for(lambda: (runs.status("pair").get("progress") or {}).get("step", 0) >= 2 and _started(runs, pods), 120,
             "both trainers to run")
    runs.patch_spec("pair", {"runPolicy": {"suspend": True}})
    runs.wait_phase("pair", "Suspended", 60)
    wait_for(lambda: not set(pods) & set(_alive(runs, "pair")), 120, "both pods to stop")
    assert runs.jobs("pair") == []
