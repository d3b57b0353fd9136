"""The lifecycle core's rules, case by case, with a fake clock (``now`` is a plain float): what an observed pod
and Job mean while an attempt is followed, how an ended attempt is recorded, cancel, suspend, TTL and deadline."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from kubetune.api.events import Event
from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION, MESSAGE_MAX_CHARS, FinetuneRunStatus
from kubetune.lifecycle.attempts import AttemptView, Decision, deadline_left, decide_attempt, wait_previous_update
from kubetune.lifecycle.conditions import (
    CLEANED_UP,
    CREATED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Notice,
    get_condition,
    set_condition,
    transition,
)
from kubetune.lifecycle.follow import (
    NOT_READ,
    NotRead,
    Step,
    after_stream,
    last_known,
    next_step,
    pod_replaced,
    stream_opened,
    trainer_failed,
    trainer_started,
    waiting_problem,
)
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.lifecycle.observed import JobState, PodState
from kubetune.lifecycle.outcome import FINISH_FIELDS, POD_DELETED, Outcome, finish_update, outcome_of
from kubetune.lifecycle.policy import cancel_pending, cancel_update, ttl_due

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0
typed = FinetuneRunStatus.model_validate

# Observed pods and Jobs of attempt 1.
UNSCHEDULED = PodState("run-a1-x", "Pending")
SCHEDULED = PodState("run-a1-x", "Pending", scheduled=True)
PULL_BACKOFF = PodState("run-a1-x", "Pending", scheduled=True, waiting_reason="ImagePullBackOff",
                        message="Back-off pulling image")
RUNNING_POD = PodState("run-a1-x", "Running", scheduled=True, started=True)
DELETING = dataclasses.replace(RUNNING_POD, deleting=True)
DELETING_PENDING = dataclasses.replace(SCHEDULED, deleting=True, scheduled=False)
SUCCEEDED_POD = PodState("run-a1-x", "Succeeded", exit_code=0, reason="Completed", scheduled=True, started=True)
SUCCEEDED_DELETING = dataclasses.replace(SUCCEEDED_POD, deleting=True)
SUCCEEDED_GONE = dataclasses.replace(SUCCEEDED_POD, gone=True)
KILLED_GONE = PodState("run-a1-x", "Failed", exit_code=137, reason="Error", started=True, gone=True)
ERROR_POD = PodState("run-a1-x", "Failed", exit_code=1, reason="Error", scheduled=True, started=True)
REPLACEMENT = PodState("run-a1-y", "Running", scheduled=True, started=True)
ACTIVE_JOB = JobState("run-a1")
FAILED_JOB = JobState("run-a1", failed=True, reason="BackoffLimitExceeded")
DEADLINE_JOB = JobState("run-a1", failed=True, reason="DeadlineExceeded", message="Job was active too long")
COMPLETE_JOB = JobState("run-a1", complete=True)


def summary(step: Step) -> tuple[str, str | None, str | None, float]:
    return (step.action, step.pod.name if step.pod else None, step.job.name if step.job else None, step.timeout)


# ------------------------------------------------------------------------------------ following: the index view
@pytest.mark.parametrize(("case", "pod", "job", "kwargs", "expected"), [
    ("a pod on a node is followed before its container runs", SCHEDULED, ACTIVE_JOB, {},
     ("follow_log", "run-a1-x", None, 0.0)),
    ("a running pod is followed", RUNNING_POD, ACTIVE_JOB, {}, ("follow_log", "run-a1-x", None, 0.0)),
    ("a pod pending on ImagePullBackOff is reported and waited on, not followed", PULL_BACKOFF, ACTIVE_JOB, {},
     ("wait", "run-a1-x", None, 5.0)),
    ("a pod not yet on a node is waited on", UNSCHEDULED, ACTIVE_JOB, {}, ("wait", "run-a1-x", None, 5.0)),
    ("no pod yet: wait", None, ACTIVE_JOB, {}, ("wait", None, None, 5.0)),
    ("a deleted pod of an active Job: wait for the replacement or the Job's failure", DELETING, ACTIVE_JOB, {},
     ("wait", None, None, 5.0)),
    ("a deleted running pod whose Job failed is followed to its end", DELETING, FAILED_JOB, {},
     ("follow_log", "run-a1-x", None, 0.0)),
    ("a deleted pending pod whose Job failed: the Job decides", DELETING_PENDING, FAILED_JOB, {},
     ("finish", None, "run-a1", 0.0)),
    ("a succeeded pod being deleted is still followed (its last lines)", SUCCEEDED_DELETING, ACTIVE_JOB, {},
     ("follow_log", "run-a1-x", None, 0.0)),
    ("a succeeded pod already removed is judged from its last watched state", SUCCEEDED_GONE, ACTIVE_JOB, {},
     ("finish", "run-a1-x", None, 0.0)),
    ("a killed pod removed before it was followed is judged", KILLED_GONE, None, {},
     ("finish", "run-a1-x", None, 0.0)),
    ("a new pod of the followed attempt replaces the lost one", REPLACEMENT, ACTIVE_JOB,
     {"followed_pod": "run-a1-x", "same_attempt_pod": True}, ("replaced", "run-a1-y", None, 0.0)),
    ("the first pod of a new attempt is no replacement", REPLACEMENT, ACTIVE_JOB,
     {"followed_pod": "run-a0-x", "same_attempt_pod": False}, ("follow_log", "run-a1-y", None, 0.0)),
    ("the followed pod again (a reconnect) is no replacement", RUNNING_POD, ACTIVE_JOB,
     {"followed_pod": "run-a1-x", "same_attempt_pod": True}, ("follow_log", "run-a1-x", None, 0.0)),
    ("a Job complete before its pod was seen: the pods are read first (one may hold the result)", None,
     COMPLETE_JOB, {}, ("read_pods", None, None, 0.0)),
    ("pod gone and Job complete: finish", None, COMPLETE_JOB, {"pods_read": True}, ("finish", None, "run-a1", 0.0)),
    ("a complete Job whose removed pod was replaced: the terminated pod decides", SCHEDULED, COMPLETE_JOB,
     {"ended_pod": SUCCEEDED_GONE}, ("finish", "run-a1-x", None, 0.0)),
    ("a complete Job with no pod left but a removed terminated one: that one decides", None, COMPLETE_JOB,
     {"ended_pod": SUCCEEDED_GONE}, ("finish", "run-a1-x", None, 0.0)),
    ("Job not in the index: wait, then look for it", None, None, {}, ("wait", None, None, 5.0)),
    ("Job gone from the index and the API server: the run is cancelled", RUNNING_POD, ACTIVE_JOB,
     {"job_gone": True}, ("job_deleted", None, None, 0.0)),
])
def test_next_step_from_the_index(case: str, pod: PodState | None, job: JobState | None, kwargs: dict[str, Any],
                                  expected: tuple[str, str | None, str | None, float]) -> None:
    kwargs = {"followed_pod": None, "same_attempt_pod": False, **kwargs}
    assert summary(next_step(pod, job, **kwargs)) == expected, case


def test_only_a_missing_job_is_looked_for_after_a_wait() -> None:
    missing = next_step(None, None, followed_pod=None, same_attempt_pod=False)
    seen = next_step(None, ACTIVE_JOB, followed_pod=None, same_attempt_pod=False)
    assert missing.check_job_gone and not seen.check_job_gone


def test_a_pod_judged_without_being_followed_yields_its_termination_message_and_a_fresh_job() -> None:
    step = next_step(KILLED_GONE, None, followed_pod=None, same_attempt_pod=False)
    assert step.fold_summary and step.read_job and not step.drain_log
    ended = next_step(None, FAILED_JOB, followed_pod=None, same_attempt_pod=False, pods_read=True)
    assert not (ended.fold_summary or ended.read_job or ended.drain_log)  # the index's Job decides


# ------------------------------------------------------------------------------------ following: a stream ended
Flags = tuple[bool, bool, bool]  # drain_log, fold_summary, read_job


@pytest.mark.parametrize(("case", "pod", "opened", "state", "job", "expected", "flags"), [
    ("the stream did not open and the container is not running: look again soon", SCHEDULED, False,
     NOT_READ, NOT_READ, ("again", None, None, 0.5), (False, False, False)),
    ("the stream ended: read the pod", RUNNING_POD, True, NOT_READ, NOT_READ, ("read_pod", None, None, 0.0),
     (False, False, False)),
    ("a succeeded pod, even if deleting: finish after reading its log's rest", RUNNING_POD, True,
     SUCCEEDED_DELETING, NOT_READ, ("finish", "run-a1-x", None, 0.0), (True, True, True)),
    ("a succeeded pod removed meanwhile: finish from its termination message", RUNNING_POD, True,
     SUCCEEDED_GONE, NOT_READ, ("finish", "run-a1-x", None, 0.0), (False, True, True)),
    ("a deleted pod: read its Job", RUNNING_POD, True, DELETING, NOT_READ, ("read_job", None, None, 0.0),
     (False, False, False)),
    ("a deleted pod of an active Job: wait for the replacement or the Job's failure", RUNNING_POD, True,
     DELETING, ACTIVE_JOB, ("again", None, None, 1.0), (False, False, False)),
    ("a deleted pod whose Job failed: finish", RUNNING_POD, True, DELETING, FAILED_JOB,
     ("finish", "run-a1-x", "run-a1", 0.0), (False, False, False)),
    ("a terminated pod: finish after reading its log's rest", RUNNING_POD, True, ERROR_POD, NOT_READ,
     ("finish", "run-a1-x", None, 0.0), (True, True, True)),
    ("pod gone: read its Job", RUNNING_POD, True, None, NOT_READ, ("read_job", None, None, 0.0),
     (False, False, False)),
    ("pod gone and Job complete: finish", RUNNING_POD, True, None, COMPLETE_JOB, ("finish", None, "run-a1", 0.0),
     (False, False, False)),
    ("pod gone and Job active: look again", RUNNING_POD, True, None, ACTIVE_JOB, ("again", None, None, 1.0),
     (False, False, False)),
    ("pod and Job gone: look again at once", RUNNING_POD, True, None, None, ("again", None, None, 0.0),
     (False, False, False)),
    ("a running pod: the stream dropped, reconnect", RUNNING_POD, True, RUNNING_POD, NOT_READ,
     ("again", None, None, 1.0), (False, False, False)),
])
def test_after_stream(case: str, pod: PodState, opened: bool, state: PodState | NotRead | None,
                      job: JobState | NotRead | None, expected: tuple[str, str | None, str | None, float],
                      flags: Flags) -> None:
    step = after_stream(pod, opened=opened, state=state, job=job)
    assert summary(step) == expected, case
    assert (step.drain_log, step.fold_summary, step.read_job) == flags, case


def test_a_container_that_keeps_not_starting_is_tried_less_and_less_often() -> None:
    waits = [after_stream(SCHEDULED, opened=False, open_failures=n).timeout for n in range(1, 10)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert after_stream(SCHEDULED, opened=False, open_failures=10**6).timeout == 30.0


def test_a_removed_pod_is_known_by_its_last_watched_state_only_if_it_is_the_same_pod() -> None:
    assert last_known("run-a1-x", RUNNING_POD, KILLED_GONE) == RUNNING_POD
    assert last_known("run-a1-x", None, KILLED_GONE) == KILLED_GONE
    assert last_known("run-a1-x", None, dataclasses.replace(KILLED_GONE, name="run-a1-y")) is None
    assert last_known("run-a1-x", None, RUNNING_POD) is None  # the watch has not seen it go: unknown


# ------------------------------------------------------------------------------------ following: what it reports
def pending(**extra: Any) -> dict[str, Any]:
    return {**transition({}, "Pending", "Accepted", "Creating the trainer Job.", T0), **extra}


def event_of(notice: Notice | None) -> tuple[str, str, str] | None:
    return None if notice is None else (notice.event_type, notice.reason, notice.message)


@pytest.mark.parametrize(("case", "observed", "status", "written", "expected"), [
    ("the stream opening makes a pending run Running", "stream", pending(), "Pending",
     ("Normal", "PodRunning", "Trainer pod run-a1-x is running.")),
    ("the stream opening of a run Running in its pending status changes nothing", "stream",
     pending(phase="Running"), "Pending", None),
    ("the stream opening of a run written Running changes nothing", "stream", pending(), "Running", None),
    ("a reconnect of a Running run changes nothing", "stream", pending(phase="Running"), "Running", None),
    ("the trainer's started event makes a pending run Running", "started", pending(), "Pending",
     ("Normal", "TrainerStarted", "The trainer started.")),
    ("the trainer's started event looks at the status, not at what was written", "started", pending(), "Running",
     ("Normal", "TrainerStarted", "The trainer started.")),
    ("a started event of a Running run changes nothing", "started", pending(phase="Running"), "Pending", None),
])
def test_the_run_turns_running_once_when_the_stream_opens_or_the_trainer_starts(
        case: str, observed: str, status: dict[str, Any], written: str, expected: tuple[str, str, str] | None) -> None:
    now = T0 + 30
    notice = (stream_opened(status, "run-a1-x", written_phase=written, now=now) if observed == "stream"
              else trainer_started(status, now))
    assert event_of(notice) == expected, case
    if notice is not None:
        assert notice.update == transition(status, "Running", notice.reason, notice.message, now), case
        assert notice.update["startTime"] == now_rfc3339(now), case
        assert (get_condition(notice.update["conditions"], RUNNING) or {}).get("status") == "True", case


def test_running_keeps_the_start_time_of_an_earlier_attempt() -> None:
    notice = stream_opened(pending(startTime=now_rfc3339(T0)), "run-a2-x", written_phase="Pending", now=T0 + 300)
    assert notice is not None and "startTime" not in notice.update


def test_a_replaced_pod_is_a_warning_and_the_runs_message() -> None:
    notice = pod_replaced("run-a1-x", "run-a1-y", 1)
    message = ("Trainer pod run-a1-x of attempt 1 is gone; the Job started run-a1-y, which resumes from the latest "
               "checkpoint.")
    assert notice == Notice({"message": message}, "Warning", "TrainerPodReplaced", message)


PULL_ERR = dataclasses.replace(PULL_BACKOFF, waiting_reason="ErrImagePull", message="not found")
CONFIG_ERROR = dataclasses.replace(PULL_BACKOFF, waiting_reason="CreateContainerConfigError", message=None)
CREATING = dataclasses.replace(SCHEDULED, waiting_reason="ContainerCreating")
LONG_BACKOFF = dataclasses.replace(PULL_BACKOFF, message="x" * 2000)


@pytest.mark.parametrize(("case", "pod", "reported", "expected"), [
    ("an image that cannot be pulled is a warning named after the problem", PULL_BACKOFF, None,
     ("Warning", "ImagePullBackOff", "Trainer pod run-a1-x: ImagePullBackOff: Back-off pulling image")),
    ("the same problem again is not reported twice", PULL_BACKOFF, "ImagePullBackOff", None),
    ("another problem is reported", PULL_BACKOFF, "ErrImagePull",
     ("Warning", "ImagePullBackOff", "Trainer pod run-a1-x: ImagePullBackOff: Back-off pulling image")),
    ("a problem back after another one is reported again", PULL_ERR, "ImagePullBackOff",
     ("Warning", "ErrImagePull", "Trainer pod run-a1-x: ErrImagePull: not found")),
    ("a problem without a message ends with its reason", CONFIG_ERROR, None,
     ("Warning", "CreateContainerConfigError", "Trainer pod run-a1-x: CreateContainerConfigError:")),
    ("a container being created is no problem", CREATING, None, None),
    ("a pod not waiting on its container is no problem", UNSCHEDULED, None, None),
])
def test_a_pod_waiting_on_a_problem_is_reported_once_per_problem_in_a_row(
        case: str, pod: PodState, reported: str | None, expected: tuple[str, str, str] | None) -> None:
    notice = waiting_problem(pod, reported)
    assert event_of(notice) == expected, case
    if notice is not None:
        assert notice.update == {"message": notice.message}, case


def test_a_waiting_problems_long_message_is_cut_in_the_status_and_the_event() -> None:
    notice = waiting_problem(LONG_BACKOFF, None)
    assert notice is not None and len(notice.message) == MESSAGE_MAX_CHARS
    assert notice.update["message"] == notice.message


@pytest.mark.parametrize(("case", "event", "message"), [
    ("the trainer's reason and message", Event(type="failed", reason="BadData", message="empty shard"),
     "BadData: empty shard"),
    ("no reason: Failed", Event(type="failed", message="boom"), "Failed: boom"),
    ("neither: Failed alone", Event(type="failed"), "Failed: "),
    ("a long message is cut", Event(type="failed", reason="R", message="y" * 2000),
     ("R: " + "y" * 2000)[:MESSAGE_MAX_CHARS]),
])
def test_a_trainers_failed_event_is_the_runs_message(case: str, event: Event, message: str) -> None:
    assert trainer_failed(event) == {"message": message}, case


WAIT_A2 = Decision("wait_previous", 2, "run-a2", "retry", new_attempt=True, waiting_for=("run-a1-x", "run-a1-y"))
WAITING_A2 = "Waiting for pod(s) run-a1-x, run-a1-y of an earlier attempt to stop before attempt 2 starts."


@pytest.mark.parametrize(("case", "status", "decision", "expected"), [
    ("the run's message names the pods waited for", pending(), WAIT_A2, {"message": WAITING_A2}),
    ("said already: nothing to write", pending(message=WAITING_A2), WAIT_A2, None),
    ("other pods: said again", pending(message=WAITING_A2),
     dataclasses.replace(WAIT_A2, waiting_for=("run-a1-y",)),
     {"message": "Waiting for pod(s) run-a1-y of an earlier attempt to stop before attempt 2 starts."}),
])
def test_waiting_for_an_earlier_attempts_pods_says_so_once(case: str, status: dict[str, Any], decision: Decision,
                                                           expected: dict[str, Any] | None) -> None:
    assert wait_previous_update(status, decision) == expected, case


# ------------------------------------------------------------------------------------ judging a finish step
def judge(step: Step, job_read: JobState | None = None, *, retries: int = 0, backoff_limit: int = 2) -> Outcome:
    assert step.action == "finish"
    return outcome_of(step.pod, job_read if step.read_job else step.job, failed_event=None, retries=retries,
                      backoff_limit=backoff_limit)


@pytest.mark.parametrize(("case", "step", "job_read", "expected"), [
    ("a succeeded pod succeeds even if it was deleted right after",
     after_stream(RUNNING_POD, opened=True, state=SUCCEEDED_DELETING), ACTIVE_JOB, ("succeed", "TrainingSucceeded")),
    ("a deleted pod whose Job failed is retried from the checkpoint",
     after_stream(RUNNING_POD, opened=True, state=DELETING, job=FAILED_JOB), None, ("retry", "RetryableFailure")),
    ("pod gone and Job complete: succeed", after_stream(RUNNING_POD, opened=True, state=None, job=COMPLETE_JOB),
     None, ("succeed", "TrainingSucceeded")),
    ("pod gone and the Job's deadline spent: fail", after_stream(RUNNING_POD, opened=True, state=None,
                                                                 job=DEADLINE_JOB), None,
     ("fail", "DeadlineExceeded")),
    ("a pod killed (137) and removed before it was followed: retry",
     next_step(KILLED_GONE, None, followed_pod=None, same_attempt_pod=False), FAILED_JOB,
     ("retry", "RetryableFailure")),
    ("a trainer error (exit 1): fail fast", after_stream(RUNNING_POD, opened=True, state=ERROR_POD), FAILED_JOB,
     ("fail", "TrainerError")),
])
def test_finish_steps_are_judged(case: str, step: Step, job_read: JobState | None,
                                 expected: tuple[str, str]) -> None:
    outcome = judge(step, job_read)
    assert (outcome.action, outcome.reason) == expected, case


def test_a_pod_lost_with_its_job_failed_is_called_deleted_and_counts_against_the_backoff_limit() -> None:
    step = after_stream(RUNNING_POD, opened=True, state=DELETING, job=FAILED_JOB)
    assert POD_DELETED in judge(step).message and "retry 1/2" in judge(step).message
    assert judge(step, retries=2).reason == "BackoffLimitExceeded"


# ------------------------------------------------------------------------------------ recording the outcome
def running(**extra: Any) -> dict[str, Any]:
    return {**transition({}, "Running", "PodRunning", "Trainer pod run-a1-x is running.", T0), "attempts": 1,
            "jobName": "run-a1", **extra}


def test_finish_update_succeeded_names_the_artifact() -> None:
    outcome = Outcome("succeed", "TrainingSucceeded", "The trainer finished and published the artifact.")
    patch = finish_update(outcome, typed(running(artifact={"uri": "s3://b/runs/r1/"})), T0 + 60)
    assert patch["phase"] == "Succeeded" and patch["completionTime"] == now_rfc3339(T0 + 60)
    assert patch["message"] == outcome.message + " Artifact: s3://b/runs/r1/"
    assert (get_condition(patch["conditions"], SUCCEEDED) or {}).get("status") == "True"
    assert (get_condition(patch["conditions"], RUNNING) or {}).get("status") == "False"
    assert "retries" not in patch


def test_finish_update_succeeded_without_a_summary_says_where_the_artifact_is() -> None:
    outcome = Outcome("succeed", "TrainingSucceeded", "The trainer finished and published the artifact.")
    patch = finish_update(outcome, typed(running()), T0 + 60)
    assert patch["phase"] == "Succeeded" and "summary was not received" in patch["message"]
    assert patch["message"].endswith("the artifact is in the run's output location.")


@pytest.mark.parametrize(("retries", "expected"), [(None, 1), (1, 2)])
def test_finish_update_retry_counts_it_and_is_pending_restarting(retries: int | None, expected: int) -> None:
    outcome = Outcome("retry", "RetryableFailure", "Trainer attempt failed (exit code 137); retry 1/2.")
    before = running(**({"retries": retries} if retries is not None else {}))
    patch = finish_update(outcome, typed(before), T0 + 60)
    assert patch["retries"] == expected and patch["phase"] == "Pending" and patch["message"] == outcome.message
    restarting = get_condition(patch["conditions"], RESTARTING) or {}
    assert restarting.get("status") == "True" and restarting.get("reason") == "RetryableFailure"
    assert restarting.get("lastTransitionTime") == now_rfc3339(T0 + 60)
    assert (get_condition(patch["conditions"], RUNNING) or {}).get("status") == "False"
    assert "completionTime" not in patch
    # A restarted operator goes on with the retry (a new attempt), it does not judge the failure again.
    after = typed({**before, **patch})
    decision = decide_attempt(AttemptView.from_status(after), run_name="run", retry_pending=False, job_exists=True,
                              alive_pods=(), deadline_left=None)
    assert (decision.action, decision.attempt, decision.reason) == ("create", 2, "retry")


def test_finish_update_failed_ends_the_run_and_clears_restarting() -> None:
    outcome = Outcome("fail", "OutOfMemory", "The trainer ran out of memory (OOMKilled).")
    before = running(conditions=set_condition(running()["conditions"], RESTARTING, "True", "RetryableFailure", "x",
                                              T0))
    patch = finish_update(outcome, typed(before), T0 + 60)
    assert patch["phase"] == "Failed" and patch["message"] == outcome.message
    assert patch["completionTime"] == now_rfc3339(T0 + 60) and "retries" not in patch
    assert (get_condition(patch["conditions"], "Failed") or {}).get("reason") == "OutOfMemory"
    assert (get_condition(patch["conditions"], RESTARTING) or {}).get("status") == "False"


@pytest.mark.parametrize("action", ["succeed", "retry", "fail"])
def test_finish_update_reads_only_its_fields(action: str) -> None:
    outcome = Outcome(action, "R", "m")  # type: ignore[arg-type]
    full = running(retries=1, artifact={"uri": "s3://b/run/"}, progress={"epoch": 2, "epochs": 2},
                   logTail=["x"], checkpoint="s3://b/ckpt")
    only = {k: v for k, v in full.items() if k in FINISH_FIELDS}
    assert finish_update(outcome, typed(only), T0) == finish_update(outcome, typed(full), T0)


# ------------------------------------------------------------------------------------ cancel, suspend, TTL, deadline
CANCEL = {"annotations": {CANCEL_ANNOTATION: "2027-01-15T08:00:00Z", CANCEL_BY_ANNOTATION: "alice"}}


def intent_recorded(now: float) -> dict[str, Any]:
    """The status while attempt 1's Job is being created: the intent is recorded, the create not confirmed."""
    return {**transition({}, "Pending", "Accepted", "Creating the trainer Job.", now), "attempts": 1,
            "jobName": "run-a1", "conditions": set_condition([], CREATED, "False", "Creating", "Creating Job run-a1.",
                                                             now)}


def test_cancel_during_create_applies_once_and_ends_the_run_for_good() -> None:
    status = intent_recorded(T0)
    assert not cancel_pending({}, status)
    assert cancel_pending(CANCEL, status)
    patch = cancel_update(status, CANCEL, deleted_jobs=1, now=T0 + 2)
    assert patch["phase"] == "Cancelled" and patch["completionTime"] == now_rfc3339(T0 + 2)
    assert "by alice at 2027-01-15T08:00:00Z" in patch["message"] and "deleted 1 Job(s)" in patch["message"]
    assert not cancel_pending(CANCEL, {**status, **patch})  # Cancelled is terminal: not cancelled again


def test_a_cancel_after_the_run_ended_changes_nothing() -> None:
    succeeded = {**running(), **transition(running(), "Succeeded", "TrainingSucceeded", "done", T0 + 60)}
    assert not cancel_pending(CANCEL, succeeded)


def test_suspend_during_retry_backoff_resumes_with_the_retry_without_counting_it_twice() -> None:
    retry = Outcome("retry", "RetryableFailure", "Trainer attempt failed (exit code 137); retry 1/2.")
    status = {**running(startTime=now_rfc3339(T0)), **finish_update(retry, typed(running()), T0 + 100)}
    # Suspended 2 s later, during the backoff before attempt 2 (what the suspend handler writes).
    status.update(transition(status, "Suspended", "Suspended", "Suspended: deleted 1 Job(s).", T0 + 102))
    view = AttemptView.from_status(typed(status))
    assert view.restarting and view.resuming and typed(status).retries == 1
    assert deadline_left(1000, typed(status), T0 + 602) == pytest.approx(1000 - 102)  # suspended time not counted
    # Unsuspended at T0 + 602 (the resume handler): the next attempt is the retry, counted once.
    status["conditions"] = set_condition(status["conditions"], SUSPENDED, "False", "Resumed", "x", T0 + 602)
    status["suspendedSeconds"] = 500.0
    decision = decide_attempt(AttemptView.from_status(typed(status)), run_name="run", retry_pending=False,
                              job_exists=False, alive_pods=(), deadline_left=deadline_left(1000, typed(status),
                                                                                         T0 + 602))
    assert (decision.action, decision.attempt, decision.reason, decision.new_attempt) == ("create", 2, "retry", True)
    assert typed(status).retries == 1


def finished(**extra: Any) -> dict[str, Any]:
    return {**running(), **transition(running(), "Succeeded", "TrainingSucceeded", "done", T0), **extra}


@pytest.mark.parametrize(("case", "status", "ttl", "now", "due"), [
    ("a running run has no TTL yet", running(), 60, T0 + 1e6, False),
    ("no TTL set: never", finished(), None, T0 + 1e6, False),
    ("before the TTL", finished(), 60, T0 + 59, False),
    ("at the TTL", finished(), 60, T0 + 60, True),
    ("after the TTL", finished(), 60, T0 + 3600, True),
    ("after it was cleaned up: not again", finished(conditions=set_condition(
        finished()["conditions"], CLEANED_UP, "True", "TTLExpired", "x", T0 + 60)), 60, T0 + 3600, False),
])
def test_ttl_due(case: str, status: dict[str, Any], ttl: int | None, now: float, due: bool) -> None:
    assert ttl_due(status, ttl, now) is due, case


@pytest.mark.parametrize(("case", "extra", "now", "left"), [
    ("not started: nothing spent", {}, T0 + 500, 100.0),
    ("running: time since the start", {"startTime": now_rfc3339(T0)}, T0 + 30, 70.0),
    ("time suspended before is not counted", {"startTime": now_rfc3339(T0), "suspendedSeconds": 50.0}, T0 + 120,
     30.0),
    ("time suspended now is not counted", {"startTime": now_rfc3339(T0), "conditions": set_condition(
        [], SUSPENDED, "True", "Suspended", "x", T0 + 40)}, T0 + 1000, 60.0),
    ("spent", {"startTime": now_rfc3339(T0)}, T0 + 150, -50.0),
])
def test_deadline_left(case: str, extra: dict[str, Any], now: float, left: float) -> None:
    assert deadline_left(100, typed(extra), now) == pytest.approx(left), case


def test_a_spent_deadline_starts_no_new_attempt() -> None:
    status = typed({**running(startTime=now_rfc3339(T0)), "conditions": set_condition(
        [], CREATED, "True", "JobCreated", "x", T0)})
    left = deadline_left(100, status, T0 + 150)
    decision = decide_attempt(AttemptView.from_status(status), run_name="run", retry_pending=True, job_exists=True,
                              alive_pods=(), deadline_left=left)
    assert decision.action == "fail_deadline"
