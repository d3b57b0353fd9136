"""The attempt rules of the pure lifecycle core, case by case, with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.spec import FinetuneRunStatus
from kubetune.lifecycle.attempts import (
    CREATE_BACKOFF_MAX_SECONDS,
    AttemptView,
    create_backoff,
    deadline_left,
    decide_attempt,
    spec_edit_update,
    suspended_seconds,
)
from kubetune.lifecycle.conditions import CREATED, RESTARTING, SPEC_VALID, SUSPENDED, get_condition, set_condition
from kubetune.lifecycle.formats import now_rfc3339

T0 = 1_800_000_000.0
typed = FinetuneRunStatus.model_validate


def status(*, attempts: int = 0, created: str | None = None, restarting: bool = False, suspended: str | None = None,
           phase: str | None = "Pending", **extra: Any) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = []
    if created is not None:
        conditions = set_condition(conditions, CREATED, created, "X", "x", T0)
    if restarting:
        conditions = set_condition(conditions, RESTARTING, "True", "RetryableFailure", "x", T0)
    if suspended is not None:
        conditions = set_condition(conditions, SUSPENDED, suspended, "Suspended", "x", T0)
    out: dict[str, Any] = {"phase": phase, "conditions": conditions, **extra}
    if attempts:
        out.update(attempts=attempts, jobName=f"run-a{attempts}")
    return out


def decide(st: dict[str, Any], *, retry_pending: bool = False, job_exists: bool = True,
           alive: tuple[tuple[int, str], ...] = (), left: float | None = None) -> tuple[str, int, str, bool]:
    d = decide_attempt(AttemptView.from_status(typed(st)), run_name="run", retry_pending=retry_pending,
                       job_exists=job_exists, alive_pods=alive, deadline_left=left)
    return d.action, d.attempt, d.reason, d.new_attempt


@pytest.mark.parametrize(("case", "st", "kwargs", "expected"), [
    ("first start", status(), {}, ("create", 1, "initial", True)),
    ("running attempt is followed", status(attempts=2, created="True"), {}, ("follow", 2, "initial", False)),
    ("its Job was deleted: cancelled, never re-created", status(attempts=2, created="True"),
     {"job_exists": False}, ("job_deleted", 2, "initial", False)),
    ("restart between intent and create: the same attempt", status(attempts=2, created="False"), {},
     ("create", 2, "resume", False)),
    ("refused create retried: the same attempt", status(attempts=1, created="False"), {"job_exists": False},
     ("create", 1, "resume", False)),
    ("retry after a retryable failure", status(attempts=1, created="True"), {"retry_pending": True},
     ("create", 2, "retry", True)),
    ("restart during retry backoff: the retry goes on, not re-judged", status(attempts=1, created="True",
                                                                           restarting=True), {},
     ("create", 2, "retry", True)),
    ("unsuspended: a new attempt resumes", status(attempts=1, created="True", suspended="True",
                                                  phase="Suspended"), {}, ("create", 2, "resume", True)),
    ("never two trainers: the previous pod still terminating", status(attempts=1, created="True"),
     {"retry_pending": True, "alive": ((1, "run-a1-x"),)}, ("wait_previous", 2, "retry", True)),
    ("suspend during retry backoff, then unsuspend: waits for the old pod", status(
        attempts=1, created="True", restarting=True, suspended="True", phase="Suspended"),
     {"alive": ((1, "run-a1-x"),)}, ("wait_previous", 2, "retry", True)),
    ("re-create of attempt 2 waits for attempt 1's pod", status(attempts=2, created="False"),
     {"alive": ((1, "run-a1-x"),)}, ("wait_previous", 2, "resume", False)),
    ("the attempt's own pod does not block its re-create", status(attempts=2, created="False"),
     {"alive": ((2, "run-a2-x"),)}, ("create", 2, "resume", False)),
    ("deadline spent: no new attempt", status(attempts=1, created="True"), {"retry_pending": True, "left": 0.0},
     ("fail_deadline", 2, "retry", False)),
    ("deadline left: the retry starts", status(attempts=1, created="True"), {"retry_pending": True, "left": 5.0},
     ("create", 2, "retry", True)),
    ("a running attempt is followed past its deadline (its Job enforces it)", status(attempts=1, created="True"),
     {"left": -5.0}, ("follow", 1, "initial", False)),
])
def test_decide_attempt_cases(case: str, st: dict[str, Any], kwargs: dict[str, Any],
                              expected: tuple[str, int, str, bool]) -> None:
    assert decide(st, **kwargs) == expected, case


def test_decide_attempt_names_the_pods_it_waits_for_and_the_jobs_are_deterministic() -> None:
    d = decide_attempt(AttemptView.from_status(typed(status(attempts=3, created="True"))), run_name="shoes",
                       retry_pending=True, job_exists=True, alive_pods=[(3, "shoes-a3-abc")], deadline_left=None)
    assert d.job_name == "shoes-a4" and d.waiting_for == ("shoes-a3-abc",)


def test_deadline_excludes_time_suspended() -> None:
    start = {"startTime": now_rfc3339(T0)}
    assert deadline_left(None, typed(start), T0 + 1e6) is None
    assert deadline_left(100, typed({}), T0) == 100  # not started yet: nothing spent
    assert deadline_left(100, typed(start), T0 + 30) == pytest.approx(70)
    # 30 s suspended before: not counted
    assert deadline_left(100, typed({**start, "suspendedSeconds": 30.0}), T0 + 60) == pytest.approx(70)
    # suspended now since T0 + 40 (the condition's transition time), 20 s ago
    now_suspended = {**start, "conditions": set_condition([], SUSPENDED, "True", "Suspended", "x", T0 + 40)}
    assert suspended_seconds(typed(now_suspended), T0 + 60) == pytest.approx(20)
    assert deadline_left(100, typed(now_suspended), T0 + 60) == pytest.approx(60)
    resumed = {**start, "conditions": set_condition([], SUSPENDED, "False", "Resumed", "x", T0 + 40)}
    assert suspended_seconds(typed(resumed), T0 + 60) == 0.0


def test_create_backoff_doubles_up_to_a_cap() -> None:
    delays = [create_backoff(n) for n in range(1, 10)]
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]
    assert max(delays) == CREATE_BACKOFF_MAX_SECONDS and delays == sorted(delays)


def test_spec_edit_update_reports_invalid_edits_and_keeps_the_running_generation() -> None:
    st = status(attempts=1, created="True", attemptGeneration=1)
    bad = spec_edit_update(typed(st), 2, "spec.data.valSplit: cannot be set beside spec.data.evalData", T0)
    cond = get_condition(bad["conditions"], SPEC_VALID)
    assert cond is not None and cond["status"] == "False" and cond["reason"] == "InvalidSpecUpdate"
    assert "generation 2 is invalid" in bad["message"] and "generation 1" in bad["message"]
    assert "spec.data.valSplit" in bad["message"] and "observedGeneration" not in bad
    good = spec_edit_update(typed({**st, "conditions": bad["conditions"]}), 3, None, T0 + 1)
    cond = get_condition(good["conditions"], SPEC_VALID)
    assert cond is not None and cond["status"] == "True" and good["observedGeneration"] == 3
    assert "next attempt" in good["message"]
