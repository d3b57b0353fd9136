"""The rules for a run's course from outside its attempts (kubetune.lifecycle.policy): acceptance, when the
supervisor and the TTL timer run, suspend and resume, TTL cleanup. Case by case, with a fake clock (``now`` is a
plain float)."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.spec import CANCEL_ANNOTATION, FinetuneRunStatus
from kubetune.lifecycle.conditions import CLEANED_UP, RUNNING, SUSPENDED, get_condition, set_condition, transition
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.lifecycle.policy import (
    accept_update,
    accepting,
    is_active,
    is_suspended,
    resume_update,
    suspend_toggle,
    suspend_update,
    ttl_pending,
    ttl_update,
)
from kubetune.operator import handlers

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0
CANCEL = {"annotations": {CANCEL_ANNOTATION: ""}}
SUSPEND = {"runPolicy": {"suspend": True}}
TTL = {"runPolicy": {"ttlSecondsAfterFinished": 60}}


def phase(name: str | None, **extra: Any) -> dict[str, Any]:
    return {**(transition({}, name, name, name, T0) if name else {}), **extra}


def cleaned(name: str) -> dict[str, Any]:
    st = phase(name)
    return {**st, "conditions": set_condition(st["conditions"], CLEANED_UP, "True", "TTLExpired", "x", T0)}


def cond(update: dict[str, Any], type_: str) -> tuple[str | None, str | None, str | None]:
    c = get_condition(update.get("conditions"), type_) or {}
    return c.get("status"), c.get("reason"), c.get("lastTransitionTime")


# ------------------------------------------------------------------------------------ when the supervisor runs
@pytest.mark.parametrize(("case", "spec", "status", "meta", "active"), [
    ("a new run", {}, {}, {}, True),
    ("a running run", {}, phase("Running"), {}, True),
    ("kopf may hand empty values", None, None, None, True),
    ("a suspended run", SUSPEND, phase("Suspended"), {}, False),
    ("a run asked to suspend, still Running", SUSPEND, phase("Running"), {}, False),
    ("a run with a cancel request", {}, phase("Running"), CANCEL, False),
    ("a succeeded run", {}, phase("Succeeded"), {}, False),
    ("a failed run", {}, phase("Failed"), {}, False),
    ("a cancelled run", {}, phase("Cancelled"), {}, False),
])
def test_the_supervisor_runs_only_while_the_run_is_unfinished_unsuspended_and_not_cancelled(
        case: str, spec: Any, status: Any, meta: Any, active: bool) -> None:
    assert is_active(spec, status, meta) is active, case
    assert handlers._active(spec=spec, status=status, meta=meta, name="run") is active, case  # kopf's filter


@pytest.mark.parametrize(("spec", "suspended"), [
    (None, False), ({}, False), ({"runPolicy": None}, False), ({"runPolicy": {"suspend": False}}, False),
    (SUSPEND, True)])
def test_a_run_is_suspended_by_its_run_policy(spec: Any, suspended: bool) -> None:
    assert is_suspended(spec) is suspended


@pytest.mark.parametrize(("case", "spec", "status", "pending"), [
    ("a running run: not yet", TTL, phase("Running"), False),
    ("a finished run without a TTL: never", {}, phase("Succeeded"), False),
    ("a finished run with a TTL", TTL, phase("Succeeded"), True),
    ("a failed run with a TTL", TTL, phase("Failed"), True),
    ("a TTL of 0 counts", {"runPolicy": {"ttlSecondsAfterFinished": 0}}, phase("Cancelled"), True),
    ("cleaned up already: the timer stops", TTL, cleaned("Succeeded"), False),
])
def test_the_ttl_timer_runs_for_finished_runs_with_a_ttl_until_they_are_cleaned_up(
        case: str, spec: Any, status: Any, pending: bool) -> None:
    assert ttl_pending(spec, status) is pending, case
    assert handlers._ttl_pending(spec=spec, status=status, name="run") is pending, case  # kopf's filter


def test_the_ttl_cleanup_says_what_it_deleted_and_marks_the_run_cleaned_up() -> None:
    status = phase("Succeeded")
    message, update = ttl_update(status, 2, 1, T0 + 90)
    assert message == "TTL after finish expired: deleted 2 Job(s) and 1 ConfigMap(s)."
    assert set(update) == {"conditions"}  # the run's phase and message stay
    assert cond(update, CLEANED_UP) == ("True", "TTLExpired", now_rfc3339(T0 + 90))
    assert not ttl_pending(TTL, {**status, **update})


# ------------------------------------------------------------------------------------ acceptance
@pytest.mark.parametrize(("case", "status", "meta", "new"), [
    ("created: no status yet", {}, {}, True),
    ("kopf may hand empty values", None, None, True),
    ("seen again after a restart, Pending", phase("Pending"), {}, False),
    ("seen again after a restart, finished", phase("Succeeded"), {}, False),
    ("a cancel requested before it was accepted: the cancel handler's", {}, CANCEL, False),
])
def test_a_run_is_accepted_once_and_never_after_a_cancel_request(case: str, status: Any, meta: Any,
                                                                 new: bool) -> None:
    assert accepting(status, meta) is new, case


@pytest.mark.parametrize(("case", "invalid", "suspended", "expected"), [
    ("an invalid spec fails the run at once, naming the fields", "spec.data: required", False,
     ("Failed", "InvalidSpec", "Invalid spec: spec.data: required")),
    ("an invalid suspended spec fails too", "spec.data: required", True,
     ("Failed", "InvalidSpec", "Invalid spec: spec.data: required")),
    ("created suspended: it waits", None, True, ("Suspended", "Suspended", "Created suspended; unsuspend to start.")),
    ("valid and not suspended: the supervisor starts it", None, False, None),
])
def test_acceptance_fails_an_invalid_spec_and_holds_a_suspended_run(
        case: str, invalid: str | None, suspended: bool, expected: tuple[str, str, str] | None) -> None:
    accepted = accept_update({}, 4, invalid=invalid, suspended=suspended, now=T0)
    if expected is None:
        assert accepted is None, case
        return
    assert accepted is not None
    change, update = accepted
    assert (change.phase, change.reason, change.message) == expected, case
    assert (update["phase"], update["message"], update["observedGeneration"]) == (expected[0], expected[2], 4), case
    assert (update.get("completionTime") is not None) is (expected[0] == "Failed"), case  # Failed is final


def test_an_invalid_spec_message_is_clipped_in_the_status_but_whole_for_the_event() -> None:
    accepted = accept_update({}, 1, invalid="x" * 5000, suspended=False, now=T0)
    assert accepted is not None
    change, update = accepted
    assert len(change.message) > 5000 and len(update["message"]) == 1024 and update["message"].endswith("…")


# ------------------------------------------------------------------------------------ suspend and resume
@pytest.mark.parametrize(("case", "old", "new", "status", "meta", "toggle"), [
    ("suspended", False, True, phase("Running"), {}, "suspend"),
    ("unsuspended", True, False, phase("Suspended"), {}, "resume"),
    ("set from unset (None is the creation's, accept's)", None, True, {}, {}, None),
    ("a missing field counts as not suspended", True, None, phase("Suspended"), {}, "resume"),
    ("no flip", True, True, phase("Suspended"), {}, None),
    ("a finished run is not suspended", False, True, phase("Succeeded"), {}, None),
    ("a finished run is not resumed", True, False, phase("Failed"), {}, None),
    ("a run with a cancel request is the cancel's", False, True, phase("Running"), CANCEL, None),
])
def test_a_suspend_flip_suspends_or_resumes_only_a_live_uncancelled_run(
        case: str, old: Any, new: Any, status: Any, meta: Any, toggle: str | None) -> None:
    assert suspend_toggle(old, new, status, meta) == toggle, case


def test_suspend_ends_the_running_phase_and_says_the_checkpoints_are_kept() -> None:
    running = phase("Running", startTime=now_rfc3339(T0))
    running["conditions"] = set_condition(running["conditions"], RUNNING, "True", "PodRunning", "x", T0)
    update = suspend_update(running, 1, T0 + 30)
    assert update["phase"] == "Suspended"
    assert update["message"] == "Suspended: deleted 1 Job(s); checkpoints are kept."
    assert cond(update, SUSPENDED) == ("True", "Suspended", now_rfc3339(T0 + 30))
    assert cond(update, RUNNING)[:2] == ("False", "Suspended")
    assert "completionTime" not in update  # not final: unsuspend resumes it


@pytest.mark.parametrize(("case", "persisted", "now", "total"), [
    ("the time since it was suspended is kept", None, T0 + 30 + 45.5, 45.5),
    ("added to earlier suspensions", 100.0, T0 + 30 + 20, 120.0),
    ("resumed at once", 7.0, T0 + 30, 7.0),
])
def test_resume_keeps_the_time_suspended_and_ends_the_suspension(case: str, persisted: float | None, now: float,
                                                                 total: float) -> None:
    suspended = suspend_update(phase("Running"), 1, T0 + 30)
    if persisted is not None:
        suspended["suspendedSeconds"] = persisted
    update = resume_update(FinetuneRunStatus.model_validate(suspended), now)
    assert update["suspendedSeconds"] == pytest.approx(total), case
    assert cond(update, SUSPENDED) == ("False", "Resumed", now_rfc3339(now)), case
    assert set(update) == {"suspendedSeconds", "conditions"}, case  # the supervisor's intent moves the phase
