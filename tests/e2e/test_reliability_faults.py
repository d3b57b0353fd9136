"""Faults on the real cluster with the stand-in trainer image (real pods, real operator subprocess):

- the operator SIGKILLed at random points during N concurrent runs and restarted: every run ends in the right
  terminal phase with the right attempts, zero duplicate Jobs, zero orphaned Jobs/ConfigMaps, complete status;
- the trainer pod deleted mid-run: the Job's replacement pod is followed, an Event says so, the run completes;
- an OOM-killed trainer: Failed/OutOfMemory telling the user to raise spec.resources.memory;
- malformed trainer output (partial and broken events, 100 kB lines, binary, floods): the status stays small
  and correct, the operator keeps going.

Figures are printed (``-s``) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import signal
import time
from typing import Any

import pytest

from tests.integration.test_operator_support import (
    STANDIN_AFTER,
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

N_RUNS = 20
SEED = 7
KILL_WINDOW = 60.0  # seconds of random SIGKILLs; then the operator is left to finish (bounds the test's time)


def _expected(i: int) -> tuple[str, list[str], dict[str, Any]]:
    """(final phase, Job names, stand-in behaviour) of concurrent run i."""
    name = f"k{i}"
    if i % 4 == 0:  # permanent failure
        return "Failed", [f"{name}-a1"], {"exit_code": 78}
    if i % 4 == 1:  # one retryable failure, then success from the checkpoint
        return "Succeeded", [f"{name}-a1", f"{name}-a2"], {"exit_code": 75, "fail_attempts": 1, "fail_at_step": 5}
    return "Succeeded", [f"{name}-a1"], {}


def _orphans(runs: Runs) -> list[str]:
    listed: dict[str, Any] = runs.api.list_namespaced_custom_object(  # type: ignore[assignment]
        "kubetune.io", "v1alpha1", runs.namespace, "finetuneruns")
    uids = {r["metadata"]["uid"] for r in listed["items"]}
    children = [*runs.jobs(), *runs.core.list_namespaced_config_map(runs.namespace,
                                                                    label_selector="kubetune.io/run").items]
    return [f"{type(c).__name__}/{c.metadata.name}" for c in children
            if not any(o.uid in uids and o.controller for o in c.metadata.owner_references or ())]


def test_operator_sigkilled_during_concurrent_runs(standin_image: str, operator: Any, runs: Runs) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    for i in range(N_RUNS):
        _, _, behaviour = _expected(i)
        runs.create(run_manifest(f"k{i}", model=standin(steps=8, pace=0.5, **behaviour), training={"epochs": 4}))
    kills: list[float] = []

    def all_terminal() -> bool:
        return all(runs.status(f"k{i}").get("phase") in ("Succeeded", "Failed", "Cancelled") for i in range(N_RUNS))

    while not all_terminal() and time.monotonic() - started < KILL_WINDOW:
        time.sleep(rng.uniform(1.0, 6.0))
        operator.stop(signal.SIGKILL)
        kills.append(round(time.monotonic() - started, 1))
        time.sleep(rng.uniform(0.0, 1.5))
        operator.start()
    wait_for(all_terminal, 150, "every run to finish", interval=1.0)
    elapsed = time.monotonic() - started
    time.sleep(3)  # anything a restarted operator would wrongly re-create shows up by now

    duplicates, wrong = [], []
    for i in range(N_RUNS):
        phase, jobs, _ = _expected(i)
        status = runs.status(f"k{i}")
        names = sorted(j.metadata.name for j in runs.jobs(f"k{i}"))
        if status.get("phase") != phase or status.get("attempts") != len(jobs):
            wrong.append((f"k{i}", status.get("phase"), status.get("attempts"), condition(status, phase)))
        duplicates += [n for n in names if n not in jobs]
        assert names == jobs or not set(names) - set(jobs), names
        assert status.get("completionTime") and condition(status, phase).get("status") == "True", status
        if phase == "Succeeded":
            assert status["artifact"]["uri"] and status["progress"]["percent"] == 100, status
        else:
            assert condition(status, "Failed")["reason"] == "StandInFailure", status
    assert wrong == [] and duplicates == []
    assert _orphans(runs) == []
    assert runs.config_maps("k0") == []  # the run config travels in each attempt's Job
    print(f"\n{N_RUNS} runs, operator SIGKILLed {len(kills)} times at {kills} s: all terminal after {elapsed:.0f}s, "
          f"0 wrong phases, {len(duplicates)} duplicate Jobs, 0 orphans")


def test_trainer_pod_deleted_mid_run_is_replaced_and_the_run_completes(standin_image: str, operator: Any,
                                                                       runs: Runs) -> None:
    # Kubernetes 1.20 (no podFailurePolicy) does one of two things with a deleted pod, by timing: the Job
    # controller starts a replacement pod in the same attempt (the operator follows it), or it counts the
    # deleted pod as a failure and fails the Job (the operator retries from the latest checkpoint as attempt 2).
    # Both must end in Succeeded with no second trainer running beside the first. The real trainer resumes from
    # the store's latest.json (steps redone: tests/e2e/test_operator_trainer.py); the stand-in has no store and
    # restarts from the Job's KUBETUNE_RESUME_FROM, so here only the operator's side is measured.
    runs.create(run_manifest("del", model=standin(steps=20, pace=0.5), training={"epochs": 5}))
    status = wait_for(lambda: (s := runs.status("del")).get("phase") == "Running"
                      and (s.get("progress") or {}).get("step", 0) >= 7 and s, 90, "progress past step 7")
    pod = status["podName"]
    deleted = time.monotonic()
    runs.core.delete_namespaced_pod(pod, runs.namespace)
    moved_on = wait_for(lambda: (s := runs.status("del")).get("podName") not in (None, pod) and s, 90,
                        "the operator to follow the replacement pod or the retry's pod")
    switch = time.monotonic() - deleted
    final = runs.wait_phase("del", "Succeeded", 120)
    jobs = sorted(j.metadata.name for j in runs.jobs("del"))
    assert jobs in (["del-a1"], ["del-a1", "del-a2"]), jobs
    assert final["attempts"] == len(jobs) and final["progress"]["step"] == 20 and final["artifact"], final
    pods = runs.core.list_namespaced_pod(runs.namespace, label_selector="kubetune.io/run=del").items
    assert not [p.metadata.name for p in pods if p.status.phase in ("Pending", "Running")], "a trainer still runs"
    if jobs == ["del-a1"]:
        path = "replacement pod followed"
        assert final["podName"] == moved_on["podName"], final
        wait_for(lambda: any(e.reason == "TrainerPodReplaced" and pod in e.message for e in runs.events("del")),
                 20, "a TrainerPodReplaced Event")
    else:
        path = "Job failed, retried as attempt 2"
        assert final["retries"] == 1 and final["podName"].startswith("del-a2-"), final
        restarting = condition(final, "Restarting")
        assert restarting["status"] == "False" and restarting["reason"] == "JobCreated", restarting
        assert any(e.reason == "RetryableFailure" for e in runs.events("del"))
    print(f"\npod deleted at step ≥ {status['progress']['step']}: {path}; new pod followed after {switch:.1f}s")


def test_oom_killed_trainer_fails_with_a_clear_reason(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("oom", model=standin(steps=5, pace=0.2, alloc_mb=512),
                             resources={"gpus": 0, "cpu": "50m", "memory": "64Mi"}))
    status = wait_for(lambda: (s := runs.status("oom")).get("phase") in ("Failed", "Succeeded") and s, 90,
                      "the OOM-killed run to finish")
    if status["phase"] == "Succeeded":
        pytest.skip("this node does not enforce memory limits (no memory cgroup): nothing was OOM-killed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "OutOfMemory", failed
    assert "out of memory" in failed["message"] and "raise spec.resources.memory" in failed["message"]
    assert status["attempts"] == 1 and len(runs.jobs("oom")) == 1  # not retried: it would run out again


def test_malformed_trainer_output_keeps_status_small(standin_image: str, operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("junk", model=standin(steps=6, pace=0.3, garbage_lines=7), training={"epochs": 2}))
    final = runs.wait_phase("junk", "Succeeded", 90)
    size = len(json.dumps(final))
    assert size < 16_384, size
    assert len(final["logTail"]) <= 30 and all(len(line) <= 500 for line in final["logTail"])
    assert final["metrics"]["after"] == STANDIN_AFTER
    assert final["progress"]["percent"] == 100 and final["progress"]["totalSteps"] == 6
    assert operator.proc.poll() is None
    log = operator.log(tail=100_000)
    assert "Traceback" not in log, log[-3000:]
    print(f"\nstatus with garbage output: {size} bytes")
