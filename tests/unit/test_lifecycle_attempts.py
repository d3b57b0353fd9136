"""The attempt rules of the pure lifecycle core, case by case, with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.spec import FinetuneRunStatus
from kubetune.lifecycle.attempts import (
    CREATE_BACKOFF_MAX_SECONDS,
    RETRY_BACKOFF_MAX_SECONDS,
    AttemptView,
    Decision,
    create_backoff,
    create_refused_update,
    created_update,
    deadline_left,
    decide_attempt,
    ending,
    intent_update,
    retry_delay,
    spec_edit_update,
    spec_to_run,
    suspended_seconds,
)
from kubetune.lifecycle.conditions import (
    CREATED,
    JOB_CREATE_FAILED,
    RESTARTING,
    SPEC_VALID,
    SUSPENDED,
    PhaseChange,
    get_condition,
    set_condition,
)
from kubetune.lifecycle.follow import job_deleted
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


def cond(update: dict[str, Any], type_: str) -> tuple[str | None, str | None, str | None]:
    """(status, reason, lastTransitionTime) of the ``type_`` condition in ``update``."""
    c = get_condition(update.get("conditions"), type_) or {}
    return c.get("status"), c.get("reason"), c.get("lastTransitionTime")


# ------------------------------------------------------------------------------------ recording the intent
def was_running(**kwargs: Any) -> dict[str, Any]:
    st = status(phase="Running", **kwargs)
    st["conditions"] = set_condition(st["conditions"], "Running", "True", "PodRunning", "x", T0)
    return st


@pytest.mark.parametrize(("case", "st", "decision", "pending", "resumed"), [
    ("first start: Pending (Accepted), creating the Job", status(phase=None), Decision("create", 1, "run-a1",
                                                                                     new_attempt=True),
     ("Accepted", "Creating the trainer Job."), False),
    ("a retry recorded while Pending (by the failure): the phase and Restarting stay",
     status(attempts=1, created="True", restarting=True), Decision("create", 2, "run-a2", "retry", True), None,
     False),
    ("a retry of a run still Running: Pending (Restarting), Running ends",
     was_running(attempts=1, created="True"), Decision("create", 2, "run-a2", "retry", True),
     ("Restarting", "Retrying from the latest checkpoint."), False),
    ("unsuspended: Pending (Resumed), the suspension ends and its time is kept",
     status(attempts=1, created="True", suspended="True", phase="Suspended", suspendedSeconds=5.0),
     Decision("create", 2, "run-a2", "resume", True), ("Resumed", "Resuming from the latest checkpoint."), True),
    ("unsuspended after the resume handler wrote: the same time, not counted twice",
     status(attempts=1, created="True", suspended="False", phase="Suspended", suspendedSeconds=5.0),
     Decision("create", 2, "run-a2", "resume", True), ("Resumed", "Resuming from the latest checkpoint."), True),
])
def test_intent_update_records_the_new_attempt_before_its_job_and_why_the_run_is_pending(
        case: str, st: dict[str, Any], decision: Decision, pending: tuple[str, str] | None, resumed: bool) -> None:
    now = T0 + 100
    update = intent_update(typed(st), decision, generation=3, attempt_generation=2, now=now)
    assert {k: update[k] for k in ("attempts", "jobName", "podName", "logCursor", "attemptGeneration",
                                   "observedGeneration")} == {
        "attempts": decision.attempt, "jobName": decision.job_name, "podName": None, "logCursor": None,
        "attemptGeneration": 2, "observedGeneration": 3}, case
    assert cond(update, CREATED) == ("False", "Creating", now_rfc3339(now)), case
    if pending is None:
        assert "phase" not in update and "message" not in update, case
        assert cond(update, RESTARTING)[0] == "True", case  # until the Job exists (created_update)
    else:
        assert (update["phase"], update["message"]) == ("Pending", pending[1]), case
        if cond(st, "Running")[0] == "True":
            assert cond(update, "Running") == ("False", pending[0], now_rfc3339(now)), case
    if resumed:
        # 5 s persisted, plus the 100 s since T0 while the condition still says Suspended=True.
        expected = 5.0 + (100.0 if cond(st, SUSPENDED)[0] == "True" else 0.0)
        assert update["suspendedSeconds"] == pytest.approx(expected), case
        assert cond(update, SUSPENDED)[:2] == ("False", "Resumed"), case
    else:
        assert "suspendedSeconds" not in update, case


# ------------------------------------------------------------------------------------ the Job exists
@pytest.mark.parametrize(("case", "st", "restarting", "create_failed", "start_time"), [
    ("the first Job starts the run", status(attempts=1, created="False", phase="Pending"), None, None,
     now_rfc3339(T0 + 50)),
    ("a retry's Job ends Restarting", status(attempts=2, created="False", restarting=True,
                                             startTime=now_rfc3339(T0)), ("False", "JobCreated"), None, None),
    ("a Job created after refusals ends JobCreateFailed", {
        **status(attempts=1, created="False", startTime=now_rfc3339(T0)),
        "conditions": set_condition(status(attempts=1, created="False")["conditions"], JOB_CREATE_FAILED, "True",
                                    "Forbidden", "quota", T0)}, None, ("False", "JobCreated"), None),
])
def test_created_update_marks_the_job_created_and_ends_restarting_and_refusals(
        case: str, st: dict[str, Any], restarting: tuple[str, str] | None, create_failed: tuple[str, str] | None,
        start_time: str | None) -> None:
    update = created_update(typed(st), f"run-a{st['attempts']}", st["attempts"], T0 + 50)
    assert cond(update, CREATED) == ("True", "JobCreated", now_rfc3339(T0 + 50)), case
    assert cond(update, RESTARTING)[:2] == (restarting or (None, None)), case
    assert cond(update, JOB_CREATE_FAILED)[:2] == (create_failed or (None, None)), case
    assert update.get("startTime") == start_time, case  # set once: the run's start is its first Job


def test_created_update_says_which_attempt_started_as_which_job() -> None:
    update = created_update(typed(status(attempts=2, created="False", restarting=True)), "run-a2", 2, T0)
    messages = {c["type"]: c["message"] for c in update["conditions"]}
    assert messages[CREATED] == "Job run-a2 created (attempt 2)."
    assert messages[RESTARTING] == "Attempt 2 started as Job run-a2."


# ------------------------------------------------------------------------------------ refused creates
@pytest.mark.parametrize(("case", "previous", "reason", "failures", "delay", "warn"), [
    ("the first refusal: a Warning, retried after 5 s", None, "Forbidden", 1, 5.0, True),
    ("the same refusal again: no new Warning, backoff doubles", ("True", "Forbidden"), "Forbidden", 2, 10.0, False),
    ("a refusal for another reason: a Warning", ("True", "Forbidden"), "Invalid", 3, 20.0, True),
    ("the first refusal after a created Job: a Warning even with the same reason", ("True", "Forbidden"),
     "Forbidden", 1, 5.0, True),
    ("after a created Job (JobCreateFailed=False): a Warning", ("False", "JobCreated"), "Forbidden", 4, 40.0, True),
])
def test_a_refused_create_is_a_condition_retried_with_backoff_and_warned_once_per_reason(
        case: str, previous: tuple[str, str] | None, reason: str, failures: int, delay: float, warn: bool) -> None:
    st = status(attempts=1, created="False")
    if previous is not None:
        st["conditions"] = set_condition(st["conditions"], JOB_CREATE_FAILED, previous[0], previous[1], "x", T0)
    refusal = create_refused_update(st, "run-a1", error="exceeded quota", reason=reason, failures=failures,
                                    now=T0 + 7)
    assert (refusal.delay, refusal.warn) == (delay, warn), case
    assert refusal.update["message"] == (f"The API server refused to create Job run-a1: exceeded quota "
                                         f"(retrying in {delay:.0f} s)."), case
    assert cond(refusal.update, JOB_CREATE_FAILED)[:2] == ("True", reason), case
    assert set(refusal.update) == {"message", "conditions"}, case  # the intent (attempt number) is kept


def test_a_refusal_without_a_reason_is_called_refused() -> None:
    refusal = create_refused_update({}, "run-a1", error="no", reason="", failures=1, now=T0)
    assert cond(refusal.update, JOB_CREATE_FAILED)[:2] == ("True", "Refused")


# ------------------------------------------------------------------------------------ retries, endings, spec
@pytest.mark.parametrize(("retries", "delay"), [(None, 2.0), (0, 2.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 60.0),
                                                (50, 60.0)])
def test_a_retry_waits_twice_as_long_each_time_up_to_a_minute(retries: int | None, delay: float) -> None:
    assert retry_delay(retries) == delay
    assert retry_delay(retries) <= RETRY_BACKOFF_MAX_SECONDS


@pytest.mark.parametrize(("case", "decision", "expected"), [
    ("a deleted Job cancels the run", Decision("job_deleted", 2, "run-a2"),
     PhaseChange("Cancelled", "JobDeleted", "Job run-a2 was deleted; the run is cancelled (it is never re-created).")),
    ("a spent deadline fails it", Decision("fail_deadline", 3, "run-a3", "retry"),
     PhaseChange("Failed", "DeadlineExceeded", "The run exceeded spec.runPolicy.activeDeadlineSeconds.")),
    ("following goes on", Decision("follow", 2, "run-a2"), None),
    ("creating goes on", Decision("create", 2, "run-a2", "retry", True), None),
    ("waiting goes on", Decision("wait_previous", 2, "run-a2", "retry", True, ("run-a1-x",)), None),
])
def test_only_a_deleted_job_or_a_spent_deadline_ends_the_run_before_an_attempt(
        case: str, decision: Decision, expected: PhaseChange | None) -> None:
    assert ending(decision) == expected, case


def test_a_job_deleted_while_followed_cancels_the_run() -> None:
    change = job_deleted("run-a2")
    assert change == PhaseChange("Cancelled", "JobDeleted", "Job run-a2 was deleted; the run is cancelled.")
    patch = change.update(status(attempts=2, created="True", phase="Running"), T0 + 5)
    assert patch["phase"] == "Cancelled" and patch["completionTime"] == now_rfc3339(T0 + 5)


@pytest.mark.parametrize(("case", "live_valid", "last_valid", "ran_once", "source"), [
    ("a valid live spec is used", True, None, True, "live"),
    ("a valid live spec wins over the last valid one", True, True, True, "live"),
    ("an invalid edit: the last valid spec goes on", False, True, True, "last_valid"),
    ("an invalid edit, none known yet: read the attempt's", False, None, True, "read_attempt_spec"),
    ("none valid, the run ran once: it fails (InvalidSpec)", False, False, True, "fail"),
    ("none valid, never ran: stop (accept failed it already)", False, False, False, "stop"),
])
def test_spec_to_run_prefers_the_live_spec_then_the_last_valid_one(
        case: str, live_valid: bool, last_valid: bool | None, ran_once: bool, source: str) -> None:
    assert spec_to_run(live_valid=live_valid, last_valid=last_valid, ran_once=ran_once) == source, case
