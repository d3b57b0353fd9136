"""What an ended attempt means for the run (succeed, retry from the latest checkpoint, fail), and the status
patch that records it. Pure."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_OK, RETRYABLE_EXIT_CODES, Event
from kubetune.api.spec import FinetuneRunStatus, Phase
from kubetune.lifecycle.conditions import RESTARTING, set_condition, transition
from kubetune.lifecycle.formats import clip
from kubetune.lifecycle.observed import JobState, PodState

OutcomeAction = Literal["succeed", "retry", "fail"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    action: OutcomeAction
    reason: str
    message: str


PERMANENT_REASONS = {EXIT_BAD_CONFIG: "InvalidConfig", EXIT_BAD_DATA: "BadData"}


POD_DELETED = "PodDeleted"  # the attempt's pod was deleted and its Job gave up instead of replacing it


def attempt_outcome(*, exit_code: int | None, pod_reason: str | None = None, job: JobState | None = None,
                    failed_event: Event | None = None, retries: int, backoff_limit: int) -> Outcome:
    """What a finished attempt means for the run.

    - exit 0 → succeed;
    - the Job's deadline (``DeadlineExceeded``) → fail (the run's activeDeadlineSeconds is spent);
    - OOMKilled → fail (it would run out of memory again);
    - exit 75 (EX_TEMPFAIL), 137/143 (killed: preemption, eviction), an evicted or deleted pod, or a trainer
      ``failed`` event with ``retryable: true`` → retry from the latest checkpoint while ``retries < backoff_limit``;
    - 78 (bad config), 65 (bad data), 1 and anything else → fail fast.
    """
    event_msg = (failed_event.message or "") if failed_event else ""
    if exit_code == EXIT_OK or (exit_code is None and job is not None and job.complete):
        return Outcome("succeed", "TrainingSucceeded", "The trainer finished and published the artifact.")
    if job is not None and job.failed and job.reason == "DeadlineExceeded":
        return Outcome("fail", "DeadlineExceeded",
                       clip(f"The run exceeded spec.runPolicy.activeDeadlineSeconds. {job.message or ''}") or "")
    if pod_reason == "OOMKilled":
        return Outcome("fail", "OutOfMemory", "The trainer ran out of memory (OOMKilled); raise "
                       "spec.resources.memory or lower spec.training.batchSize.")
    if exit_code in PERMANENT_REASONS:
        reason = (failed_event.reason if failed_event and failed_event.reason else PERMANENT_REASONS[exit_code])
        return Outcome("fail", reason, clip(f"Trainer exited with code {exit_code} (permanent). {event_msg}") or "")
    retryable = (exit_code in RETRYABLE_EXIT_CODES or pod_reason in {"Evicted", "Preempted", "Shutdown", POD_DELETED}
                 or (exit_code is None and job is None)
                 or bool(failed_event and failed_event.retryable))
    what = f"exit code {exit_code}" if exit_code is not None else (pod_reason or "pod lost")
    if retryable:
        if retries < backoff_limit:
            return Outcome("retry", "RetryableFailure", clip(
                f"Trainer attempt failed ({what}); retry {retries + 1}/{backoff_limit} from the latest "
                f"checkpoint. {event_msg}") or "")
        return Outcome("fail", "BackoffLimitExceeded", clip(
            f"Trainer failed ({what}) and spec.runPolicy.backoffLimit={backoff_limit} retries are used up. "
            f"{event_msg}") or "")
    reason = failed_event.reason if failed_event and failed_event.reason else "TrainerError"
    return Outcome("fail", reason, clip(f"Trainer failed ({what}). {event_msg}") or "")


def outcome_of(pod: PodState | None, job: JobState | None, *, failed_event: Event | None, retries: int,
               backoff_limit: int) -> Outcome:
    """:func:`attempt_outcome` for the attempt's last observed pod and Job (see :func:`.follow.next_step`)."""
    pod_reason = pod.reason if pod else None
    if (pod is None or pod.deleting) and (pod is None or pod.exit_code is None) and job is not None:
        pod_reason = POD_DELETED  # the Job ended with its pod gone before it told an exit code: lost
    return attempt_outcome(exit_code=pod.exit_code if pod else None, pod_reason=pod_reason, job=job,
                           failed_event=failed_event, retries=retries, backoff_limit=backoff_limit)


def finish_message(outcome: Outcome, status: FinetuneRunStatus) -> str:
    """The run's message (and the Event's) once the attempt ended with ``outcome``."""
    if outcome.action != "succeed":
        return outcome.message
    artifact = status.artifact.uri if status.artifact else None
    return outcome.message + (f" Artifact: {artifact}" if artifact else (
        " Its summary was not received (the pod was removed before the operator could read it); the "
        "artifact is in the run's output location."))


#: The status fields :func:`finish_update` reads (camelCase).
FINISH_FIELDS = ("conditions", "retries", "startTime", "artifact")


def finish_update(outcome: Outcome, status: FinetuneRunStatus, now: float) -> dict[str, Any]:
    """Status patch recording the attempt's ``outcome``: ``Succeeded``; a retry (``retries`` + 1,
    ``Restarting=True`` until the next attempt's Job exists, phase ``Pending``); or ``Failed``. Reads only
    ``FINISH_FIELDS`` of ``status``."""
    message = finish_message(outcome, status)
    current: dict[str, Any] = {"conditions": [c.dump() for c in status.conditions], "startTime": status.start_time}
    if outcome.action == "succeed":
        return transition(current, Phase.SUCCEEDED.value, outcome.reason, message, now)
    if outcome.action == "fail":
        return transition(current, Phase.FAILED.value, outcome.reason, message, now)
    # Restarting=True is persisted with the retry, so that an operator restarted before the next attempt's Job
    # exists goes on with the retry instead of judging (and counting) the failure again.
    current["conditions"] = set_condition(current["conditions"], RESTARTING, "True", outcome.reason, message, now)
    return {"retries": (status.retries or 0) + 1,
            **transition(current, Phase.PENDING.value, outcome.reason, message, now)}
