"""An attempt over several pods is judged as one unit (kubetune.lifecycle.gang): who decides, and when waiting
for the pods to be scheduled ends."""

from __future__ import annotations

import dataclasses

import pytest
from kubetune.lifecycle.gang import all_started, gang_outcome, gang_pod_names, scheduling_timeout
from kubetune.lifecycle.observed import PodState

pytestmark = pytest.mark.unit

RUNNING = PodState("r-a1-x", "Running", scheduled=True, started=True, created=1.0)
WORKER = PodState("r-a1-n1-y", "Running", scheduled=True, started=True, created=1.0)
PENDING = PodState("r-a1-n1-y", "Pending", reason="Unschedulable",
                   message="0/1 nodes are available: 1 Insufficient cpu.", created=1.0)


def _judge(*pods: tuple[int, PodState], retries: int = 0) -> tuple[str, str] | None:
    outcome = gang_outcome(list(pods), retries=retries, backoff_limit=2)
    return None if outcome is None else (outcome.action, outcome.reason)


@pytest.mark.parametrize(("case", "pods", "expected"), [
    ("all running: rank 0 decides", [(0, RUNNING), (1, WORKER)], None),
    ("a worker deleted: the unit is retried", [(0, RUNNING), (1, dataclasses.replace(WORKER, deleting=True))],
     ("retry", "RetryableFailure")),
    ("rank 0 removed: the unit is retried, not followed into a replacement",
     [(0, dataclasses.replace(RUNNING, gone=True, deleting=True)), (1, WORKER)], ("retry", "RetryableFailure")),
    ("a worker lost even though rank 0 then failed on its own",
     [(0, dataclasses.replace(RUNNING, phase="Failed", exit_code=1)), (1, dataclasses.replace(WORKER, gone=True))],
     ("retry", "RetryableFailure")),
    ("a worker with bad data fails the run", [(0, RUNNING), (1, dataclasses.replace(WORKER, phase="Failed",
                                                                                     exit_code=65))],
     ("fail", "BadData")),
    ("a worker out of memory fails the run", [(0, RUNNING), (1, dataclasses.replace(
        WORKER, phase="Failed", exit_code=137, reason="OOMKilled"))], ("fail", "OutOfMemory")),
    ("a preempted worker (exit 75) retries", [(0, RUNNING), (1, dataclasses.replace(WORKER, phase="Failed",
                                                                                     exit_code=75))],
     ("retry", "RetryableFailure")),
    ("a worker's exit 1 is the echo of another failure: rank 0 decides",
     [(0, RUNNING), (1, dataclasses.replace(WORKER, phase="Failed", exit_code=1))], None),
    ("a succeeded worker removed afterwards changes nothing",
     [(0, RUNNING), (1, dataclasses.replace(WORKER, phase="Succeeded", exit_code=0, gone=True))], None),
])
def test_who_decides_an_attempt_over_several_pods(case: str, pods: list[tuple[int, PodState]],
                                                  expected: tuple[str, str] | None) -> None:
    assert _judge(*pods) == expected, case


def test_a_lost_pod_names_itself_and_counts_against_the_retries() -> None:
    lost = [(0, RUNNING), (1, dataclasses.replace(WORKER, deleting=True))]
    outcome = gang_outcome(lost, retries=0, backoff_limit=2)
    assert outcome is not None and "r-a1-n1-y (node rank 1)" in outcome.message
    assert _judge(*lost, retries=2) == ("fail", "BackoffLimitExceeded")


def test_waiting_for_pods_that_cannot_all_be_scheduled_ends_with_their_reason() -> None:
    waiting = [(0, RUNNING), (1, PENDING)]
    assert scheduling_timeout(waiting, nodes=2, waited=599, timeout=600) is None
    assert scheduling_timeout(waiting, nodes=2, waited=601, timeout=None) is None
    outcome = scheduling_timeout(waiting, nodes=2, waited=601, timeout=600)
    assert outcome is not None and (outcome.action, outcome.reason) == ("fail", "SchedulingTimeout")
    assert "1 of 2 pods" in outcome.message and "Insufficient cpu" in outcome.message
    assert scheduling_timeout([(0, RUNNING), (1, WORKER)], nodes=2, waited=601, timeout=600) is None
    missing = scheduling_timeout([(0, RUNNING)], nodes=3, waited=601, timeout=600)
    assert missing is not None and "2 pod(s) not created" in missing.message


def test_status_lists_each_rank_newest_pod() -> None:
    replaced = dataclasses.replace(WORKER, name="r-a1-n1-z", created=2.0)
    pods = [(0, RUNNING), (1, dataclasses.replace(WORKER, gone=True)), (1, replaced)]
    assert gang_pod_names(pods, 3) == ["r-a1-x", "r-a1-n1-z", ""]
    assert all_started(pods, 2) and not all_started(pods, 3)
