"""Which trainer attempt a run needs next, and when it may start. Pure.

The rules, in the order :func:`decide_attempt` applies them:

1. The current attempt's Job was created (``Created=True`` for ``status.jobName``) and no retry or resume is
   due: follow it; when it is gone, the run is cancelled (a deleted Job is never re-created).
2. The intent for attempt N is persisted but its creation is not confirmed (an operator restart, or the API
   server refused the Job): create that same attempt N again (deterministic name: an existing Job is adopted).
3. Otherwise a new attempt N+1 is due (first start, retry, resume after suspend). It fails the run when
   ``activeDeadlineSeconds`` is spent (time spent suspended not counted).
4. Never two trainers: any attempt's Job starts only once no pod of another attempt of the run is still
   alive (a pod being deleted keeps running until its grace period ends and may still write checkpoints).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from kubetune.api.spec import Condition, FinetuneRunStatus, Phase
from kubetune.lifecycle.conditions import (
    CREATED,
    JOB_CREATE_FAILED,
    RESTARTING,
    SPEC_VALID,
    SUSPENDED,
    PhaseChange,
    get_condition,
    set_condition,
    transition,
)
from kubetune.lifecycle.formats import clip, now_rfc3339, parse_rfc3339
from kubetune.operator.manifests import job_name as attempt_job_name

Action = Literal["follow", "create", "wait_previous", "fail_deadline", "job_deleted"]
Reason = Literal["initial", "retry", "resume"]
SpecSource = Literal["live", "last_valid", "read_attempt_spec", "fail", "stop"]

#: Refused Job creates are retried after 5, 10, 20, ... seconds, at most this many.
CREATE_BACKOFF_MAX_SECONDS = 300.0
#: A retry's attempt starts 2, 4, 8, ... seconds after the failure was recorded, at most this many.
RETRY_BACKOFF_MAX_SECONDS = 60.0
RESUMED_MESSAGE = "Resumed; continuing from the latest checkpoint."
#: Why a run is Pending while its next attempt's Job is created: (reason, message), by the attempt's reason.
_PENDING_BECAUSE: dict[Reason, tuple[str, str]] = {
    "initial": ("Accepted", "Creating the trainer Job."),
    "retry": ("Restarting", "Retrying from the latest checkpoint."),
    "resume": ("Resumed", "Resuming from the latest checkpoint."),
}


@dataclasses.dataclass(frozen=True)
class AttemptView:
    """What the persisted status says about the run's attempts."""

    attempts: int = 0
    job_name: str | None = None
    created: bool = False  # the Created condition is True: status.jobName exists (or existed)
    restarting: bool = False  # a retryable failure was judged; the next attempt is not created yet
    resuming: bool = False  # suspended (or just unsuspended): the next attempt resumes from the checkpoint

    @classmethod
    def from_status(cls, status: FinetuneRunStatus) -> AttemptView:
        return cls(attempts=status.attempts or 0, job_name=status.job_name,
                   created=_condition_is(status, CREATED, "True"),
                   restarting=_condition_is(status, RESTARTING, "True"),
                   resuming=status.phase == Phase.SUSPENDED.value or _condition_is(status, SUSPENDED, "True"))


def _condition(status: FinetuneRunStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _condition_is(status: FinetuneRunStatus, type_: str, value: str) -> bool:
    cond = _condition(status, type_)
    return cond is not None and cond.status == value


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    attempt: int
    job_name: str
    reason: Reason = "initial"
    new_attempt: bool = False  # the attempt number moves on (the intent must be recorded)
    waiting_for: tuple[str, ...] = ()  # live pods of other attempts (action wait_previous)


def decide_attempt(view: AttemptView, *, run_name: str, retry_pending: bool, job_exists: bool,
                   alive_pods: Iterable[tuple[int, str]], deadline_left: float | None) -> Decision:
    """What the supervisor does about the run's attempt now. ``alive_pods``: (attempt, pod name) of the run's
    pods that may still be running; ``job_exists``: whether ``view.job_name`` exists on the API server."""
    alive = tuple(alive_pods)
    due = view.attempts == 0 or not view.job_name or retry_pending or view.restarting or view.resuming
    current = attempt_job_name(run_name, view.attempts)
    if not due and view.job_name == current:
        if view.created:
            return Decision("follow" if job_exists else "job_deleted", view.attempts, current)
        others = tuple(name for attempt, name in alive if attempt != view.attempts)
        if others:
            return Decision("wait_previous", view.attempts, current, "resume", waiting_for=others)
        return Decision("create", view.attempts, current, "resume")
    attempt = view.attempts + 1
    name = attempt_job_name(run_name, attempt)
    reason: Reason = "initial" if view.attempts == 0 else (
        "retry" if retry_pending or view.restarting else "resume")
    if deadline_left is not None and deadline_left <= 0:
        return Decision("fail_deadline", attempt, name, reason)
    others = tuple(pod for _, pod in alive)
    if others:
        return Decision("wait_previous", attempt, name, reason, new_attempt=True, waiting_for=others)
    return Decision("create", attempt, name, reason, new_attempt=True)


def ending(decision: Decision) -> PhaseChange | None:
    """How ``decision`` ends the run, if it does: its Job was deleted → ``Cancelled`` (a deleted Job is never
    re-created); ``activeDeadlineSeconds`` is spent → ``Failed``."""
    if decision.action == "job_deleted":
        return PhaseChange(Phase.CANCELLED.value, "JobDeleted",
                           f"Job {decision.job_name} was deleted; the run is cancelled (it is never re-created).")
    if decision.action == "fail_deadline":
        return PhaseChange(Phase.FAILED.value, "DeadlineExceeded",
                           "The run exceeded spec.runPolicy.activeDeadlineSeconds.")
    return None


def wait_previous_update(status: Mapping[str, Any], decision: Decision) -> dict[str, Any] | None:
    """Status patch while ``decision`` (``wait_previous``) waits for earlier attempts' pods to stop: the run's
    message names them; None when it says so already (the wait is looked at again every few seconds)."""
    message = (f"Waiting for pod(s) {', '.join(decision.waiting_for)} of an earlier attempt to stop before attempt "
               f"{decision.attempt} starts.")
    return None if status.get("message") == message else {"message": message}


def intent_update(status: FinetuneRunStatus, decision: Decision, *, generation: int | None,
                  attempt_generation: int | None, now: float) -> dict[str, Any]:
    """Status patch recording the intent to create ``decision``'s new attempt: its number and Job name, no pod
    and no log position yet, the spec generation it runs with, ``Created=False``; a resumed run's suspension
    ends (:func:`resumed_update`); the run is ``Pending``, with why the attempt starts.

    It goes out with the ``Created`` (or ``JobCreateFailed``) patch, not before the Job: the Job's name is
    deterministic and the decision is made from persisted state only, so an operator restarted in between
    decides the same attempt again and adopts its Job."""
    conditions = set_condition([c.dump() for c in status.conditions], CREATED, "False", "Creating",
                               f"Creating Job {decision.job_name}.", now)
    update: dict[str, Any] = {"attempts": decision.attempt, "jobName": decision.job_name, "podName": None,
                              "logCursor": None, "attemptGeneration": attempt_generation,
                              "observedGeneration": generation, "conditions": conditions}
    if AttemptView.from_status(status).resuming:
        update.update(resumed_update(status, conditions, now))
    if status.phase != Phase.PENDING.value:
        reason, message = _PENDING_BECAUSE[decision.reason]
        update.update(transition({"conditions": update["conditions"], "startTime": status.start_time},
                                 Phase.PENDING.value, reason, message, now))
    return update


def created_update(status: FinetuneRunStatus, job_name: str, attempt: int, now: float) -> dict[str, Any]:
    """Status patch once attempt ``attempt``'s Job exists (created, or adopted): ``Created=True``; a pending
    retry (``Restarting``) and a refused create (``JobCreateFailed``) are over; the run starts with its first
    Job."""
    message = f"Job {job_name} created (attempt {attempt})."
    conditions = set_condition([c.dump() for c in status.conditions], CREATED, "True", "JobCreated", message, now)
    if (get_condition(conditions, RESTARTING) or {}).get("status") == "True":
        conditions = set_condition(conditions, RESTARTING, "False", "JobCreated",
                                   f"Attempt {attempt} started as Job {job_name}.", now)
    if (get_condition(conditions, JOB_CREATE_FAILED) or {}).get("status") == "True":
        conditions = set_condition(conditions, JOB_CREATE_FAILED, "False", "JobCreated", message, now)
    update: dict[str, Any] = {"conditions": conditions}
    if not status.start_time:
        update["startTime"] = now_rfc3339(now)
    return update


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What to do about a Job create the API server refused."""

    update: dict[str, Any]  # the status patch: the run's message and JobCreateFailed=True
    delay: float  # seconds before the same attempt is created again
    warn: bool  # a Warning Event says it (repeats of the same refusal do not)


def create_refused_update(status: Mapping[str, Any], job_name: str, *, error: str, reason: str | None,
                          failures: int, now: float) -> Refusal:
    """The API server refused to create the attempt's ConfigMap or Job ``job_name`` (``reason``, ``error``: its
    answer) for the ``failures``-th time in a row: ``JobCreateFailed=True`` with its answer, retried after
    :func:`create_backoff`; the recorded intent keeps the attempt number, so the retry (or a restarted operator)
    creates the same attempt. ``status`` is taken as it is, not typed: only its conditions are read, and the
    refusal must be recorded even where the rest would not validate."""
    delay = create_backoff(failures)
    message = clip(f"The API server refused to create Job {job_name}: {error} (retrying in {delay:.0f} s).") or ""
    previous = get_condition(status.get("conditions"), JOB_CREATE_FAILED) or {}
    warn = previous.get("status") != "True" or previous.get("reason") != reason or failures == 1
    conditions = set_condition(status.get("conditions") or [], JOB_CREATE_FAILED, "True", reason or "Refused",
                               message, now)
    return Refusal({"message": message, "conditions": conditions}, delay, warn)


def retry_delay(retries: int | None) -> float:
    """Seconds between a retryable failure being recorded (``retries``: the count with it) and the next
    attempt: 2, 4, 8, ... up to ``RETRY_BACKOFF_MAX_SECONDS``."""
    return min(RETRY_BACKOFF_MAX_SECONDS, 2.0 ** int(retries or 1))


def resumed_update(status: FinetuneRunStatus, conditions: Iterable[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """Patch ending a suspension: the time spent suspended goes into ``suspendedSeconds`` (the deadline does not
    count it) and ``Suspended`` turns False in ``conditions``."""
    return {"suspendedSeconds": round(suspended_seconds(status, now), 3),
            "conditions": set_condition(conditions, SUSPENDED, "False", "Resumed", RESUMED_MESSAGE, now)}


def deadline_left(limit_seconds: int | None, status: FinetuneRunStatus, now: float) -> float | None:
    """Seconds left of ``spec.runPolicy.activeDeadlineSeconds``: counted from the run's start, less the time
    spent suspended (and, while suspended now, the time since it was suspended)."""
    if limit_seconds is None:
        return None
    started = parse_rfc3339(status.start_time)
    if started is None:
        return float(limit_seconds)
    return limit_seconds - max(0.0, now - started - suspended_seconds(status, now))


def suspended_seconds(status: FinetuneRunStatus, now: float) -> float:
    """Time spent suspended so far: the persisted total, plus the current suspension if there is one."""
    total = status.suspended_seconds or 0.0
    suspended = _condition(status, SUSPENDED)
    if suspended is not None and suspended.status == "True":
        since = parse_rfc3339(suspended.last_transition_time)
        if since is not None:
            total += max(0.0, now - since)
    return total


def create_backoff(failures: int) -> float:
    """Seconds before retrying a Job create the API server refused ``failures`` times in a row."""
    return min(CREATE_BACKOFF_MAX_SECONDS, 5.0 * 2.0 ** max(0, failures - 1))


def spec_to_run(*, live_valid: bool, last_valid: bool | None, ran_once: bool) -> SpecSource:
    """Which spec the supervisor's next decision uses: the live one when it is valid. After an invalid edit, the
    last valid one (``last_valid``: one is known; None: not looked for yet, ``read_attempt_spec`` then reads the
    spec the run's attempts were last built from), so that supervision goes on (:func:`spec_edit_update`
    reports the edit). With none valid the supervisor stops: ``fail`` (:func:`invalid_spec`) when the run ran
    once; ``stop`` when it never did (its acceptance failed it already)."""
    if live_valid:
        return "live"
    if last_valid is None:
        return "read_attempt_spec"
    if last_valid:
        return "last_valid"
    return "fail" if ran_once else "stop"


def invalid_spec(errors: str) -> PhaseChange:
    """The run fails for a spec nothing can run (``errors``: the field paths and what is wrong)."""
    return PhaseChange(Phase.FAILED.value, "InvalidSpec", f"Invalid spec: {errors}")


def spec_edit_update(status: FinetuneRunStatus, generation: int | None, errors: str | None,
                     now: float) -> dict[str, Any]:
    """Status patch for a spec edit of an active run: the ``SpecValid`` condition and a message saying what
    happens. The running attempt keeps the spec it started with; a valid edit applies from the next attempt;
    an invalid one is not applied at all (the run goes on, supervised, with its last valid spec)."""
    conditions = [c.dump() for c in status.conditions]
    if errors:
        running = status.attempt_generation if status.attempt_generation is not None else "last valid"
        message = (f"Spec generation {generation} is invalid and not applied: {errors}. The run goes on with "
                   f"generation {running}.")
        return {"message": message, "conditions": set_condition(
            conditions, SPEC_VALID, "False", "InvalidSpecUpdate", message, now)}
    message = f"Spec generation {generation} accepted; it applies from the next attempt."
    return {"message": message, "observedGeneration": generation, "conditions": set_condition(
        conditions, SPEC_VALID, "True", "SpecUpdated", message, now)}
