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
from collections.abc import Iterable
from typing import Any, Literal

from kubetune.api.spec import Condition, FinetuneRunStatus, Phase
from kubetune.lifecycle.conditions import CREATED, RESTARTING, SPEC_VALID, SUSPENDED, set_condition
from kubetune.lifecycle.formats import parse_rfc3339
from kubetune.operator.manifests import job_name as attempt_job_name

Action = Literal["follow", "create", "wait_previous", "fail_deadline", "job_deleted"]
Reason = Literal["initial", "retry", "resume"]

#: Refused Job creates are retried after 5, 10, 20, ... seconds, at most this many.
CREATE_BACKOFF_MAX_SECONDS = 300.0


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
