"""What the supervisor does next while it follows an attempt's Job and pod. Pure.

The supervisor observes (its watch index of the run's Jobs and pods, a fresh read of the pod or Job when a
:class:`Step` asks for it), calls :func:`next_step` or :func:`after_stream`, and carries out the step. The rules:

1. A pod being deleted that has not succeeded does not decide its attempt while its Job is still active: the
   Job controller either starts a replacement pod or counts a failure and fails the Job (then: retry from the
   latest checkpoint); which one depends on timing. A trainer that exited 0 has told its result whatever
   happens next.
2. A pod's log is followed as soon as the pod is on a node (the stream opens the moment the container starts),
   unless it waits on a problem (``WAITING_PROBLEMS``: reported, not followed). A new pod of the attempt whose
   pod was already followed is a replacement: its log starts afresh, and nothing the lost pod said decides.
3. When a stream ends, a fresh read of the pod says why: it succeeded (read the rest of its log, then judge);
   it is being deleted (judge once its Job failed; else wait for the replacement or the failure); it
   terminated (read the rest of its log, then judge); it is gone (its Job decides); else reconnect.
4. A terminated pod that was never followed, or an ended Job, is judged at once: an ended Job with the
   attempt's terminated pod (removed or not, even when a newer pod appeared), whose termination message carries
   the trainer's result; an ended Job whose pod the index has not seen (the pod watch lags behind the Job watch,
   as after an operator restart) once the run's pods were read from the API server.
5. Otherwise wait for a change; a Job missing from the index and the API server means it was deleted: the run
   is cancelled (never re-created).
6. What following reports: the run is ``Running`` once the trainer's log stream opens or the trainer says it
   started; a replacement pod, and a pod waiting on a problem (once per problem in a row), are Warnings and the
   run's message; a trainer's ``failed`` event is the run's message until the attempt is judged.

Judging is :func:`kubetune.lifecycle.outcome.outcome_of` on the step's pod and Job.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Final, Literal

from kubetune.api.events import Event
from kubetune.api.spec import MESSAGE_MAX_CHARS, Phase
from kubetune.lifecycle.conditions import Notice, PhaseChange
from kubetune.lifecycle.observed import JobState, PodState

Action = Literal["follow_log", "replaced", "wait", "again", "read_pod", "read_job", "read_pods", "finish",
                 "job_deleted"]

#: Container waiting reasons that need a person (or a fixed spec): the pod is reported, not followed.
WAITING_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                              "CreateContainerError", "CrashLoopBackOff"})
INDEX_WAIT_SECONDS = 5.0  # nothing to follow yet: the watch index wakes the supervisor sooner on a change
RECONNECT_SECONDS = 1.0  # a stream dropped while the trainer runs, or a deleted pod's replacement is due
# The stream could not open (the container is being created, or its image pulled: minutes for a large one): the
# next try comes when the pod watch reports a change, at the latest after a backoff from 0.5 s doubling to 30 s.
NOT_STARTED_SECONDS = 0.5
NOT_STARTED_MAX_SECONDS = 30.0


class NotRead(enum.Enum):
    NOT_READ = "not read"


#: An observation the supervisor has not made yet: it makes it when a step asks (``read_pod``/``read_job``), so
#: that the API server is read only when the answer matters, and in the order the rules need it.
NOT_READ: Final = NotRead.NOT_READ


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing for the supervisor to do.

    - ``follow_log``: follow ``pod``'s log (recording it as the attempt's pod);
    - ``replaced``: the same, and ``pod`` replaces the attempt's followed pod: the fold forgets the lost pod's
      log position and its ``started``/``finished``/``failed`` state first;
    - ``wait``: wait up to ``timeout`` s for a change (reporting ``pod``'s waiting problem, if any); then, when
      ``check_job_gone``, look whether the Job still exists and pass the answer to the next :func:`next_step`;
    - ``again``: observe again after ``timeout`` s (none: at once);
    - ``read_pod`` / ``read_job``: read the pod / the Job from the API server and call :func:`after_stream`
      again with it;
    - ``read_pods``: read the run's pods from the API server into the index and call :func:`next_step` again,
      with ``pods_read``;
    - ``finish``: the attempt ended: read the rest of ``pod``'s log when ``drain_log``, fold its termination
      message when ``fold_summary``, then judge ``pod`` with ``job`` (read from the API server first when
      ``read_job``: the index may lag behind the pod);
    - ``job_deleted``: the attempt's Job was deleted: the run is cancelled.
    """

    action: Action
    pod: PodState | None = None
    job: JobState | None = None
    timeout: float = 0.0
    drain_log: bool = False
    fold_summary: bool = False
    read_job: bool = False
    check_job_gone: bool = False


def followable(pod: PodState) -> bool:
    """Whether ``pod``'s log can be followed now (or as soon as its container starts)."""
    return not pod.gone and (
        pod.started or (pod.scheduled and not pod.terminated and pod.waiting_reason not in WAITING_PROBLEMS))


def next_step(pod: PodState | None, job: JobState | None, *, followed_pod: str | None, same_attempt_pod: bool,
              job_gone: bool = False, pods_read: bool = False, ended_pod: PodState | None = None) -> Step:
    """The step from the watch index: ``pod`` is the attempt's newest pod, ``job`` its Job (None: not seen).
    ``followed_pod``: the pod the status names; ``same_attempt_pod``: it belongs to this attempt (this process
    followed it); ``job_gone``: the last ``wait`` step found the Job in neither the index nor the API server;
    ``pods_read``: the last ``read_pods`` step read the run's pods into the index; ``ended_pod``: the attempt's
    newest terminated pod, removed or not."""
    if job_gone:
        return Step("job_deleted")
    job_ended = job is not None and job.ended
    if job_ended and ended_pod is not None and (pod is None or not pod.terminated):
        # rule 4: the Job ended, and the pod that ended it may have been removed since, even replaced by one the
        # Job controller started before it counted the first: the terminated one holds the result
        return Step("finish", pod=ended_pod, fold_summary=True, read_job=True)
    if pod is None and job_ended and not pods_read:
        return Step("read_pods")  # rule 4: its pod may hold the result
    if pod is not None and pod.deleting and not pod.succeeded and not job_ended:
        pod = None  # rule 1: neither followed nor judged; the replacement or the Job's failure shows up next
    if pod is not None and followable(pod):
        replaced = bool(followed_pod) and followed_pod != pod.name and same_attempt_pod
        return Step("replaced" if replaced else "follow_log", pod=pod)
    if pod is not None and pod.terminated:  # not followed: it exited before that, was evicted, or was removed
        return Step("finish", pod=pod, fold_summary=True, read_job=True)
    if job is not None and job.ended:
        return Step("finish", job=job)
    return Step("wait", pod=pod, timeout=INDEX_WAIT_SECONDS, check_job_gone=job is None)


def last_known(name: str, fresh: PodState | None, watched: PodState | None) -> PodState | None:
    """Pod ``name``'s state after its stream ended: as read now, or, when it was removed meanwhile, the last
    state the watch reported (it may carry the trainer's summary); None when nothing is known of it."""
    if fresh is not None:
        return fresh
    return watched if watched is not None and watched.name == name and watched.gone else None


def open_backoff(failures: int) -> float:
    """Seconds before the next log-open try after ``failures`` tries in a row found no running container."""
    return min(NOT_STARTED_MAX_SECONDS, NOT_STARTED_SECONDS * 2 ** max(0, min(failures, 16) - 1))


def after_stream(pod: PodState, *, opened: bool, state: PodState | NotRead | None = NOT_READ,
                 job: JobState | NotRead | None = NOT_READ, open_failures: int = 1) -> Step:
    """The step after following ``pod``'s log ended (``opened``: the stream opened at all; ``open_failures``:
    tries in a row that did not). ``state``: the pod as read afterwards (see :func:`last_known`); ``job``: the
    attempt's Job as read afterwards (None: gone)."""
    if not opened and not pod.started:
        return Step("again", timeout=open_backoff(open_failures))
    if state is NOT_READ:
        return Step("read_pod")
    if state is not None and state.succeeded:
        return Step("finish", pod=state, drain_log=not state.gone, fold_summary=True, read_job=True)
    if state is not None and state.deleting:
        if job is NOT_READ:
            return Step("read_job")
        if job is not None and job.failed:
            return Step("finish", pod=state, job=job)
        return Step("again", timeout=RECONNECT_SECONDS)  # rule 1: the replacement, or the Job's failure, is next
    if state is not None and state.terminated:
        return Step("finish", pod=state, drain_log=True, fold_summary=True, read_job=True)
    if state is None:
        if job is NOT_READ:
            return Step("read_job")
        if job is not None and job.ended:
            return Step("finish", job=job)
        if job is None:
            return Step("again")  # the Job is gone too: the next next_step waits and confirms it
    return Step("again", timeout=RECONNECT_SECONDS)  # the stream dropped while the trainer runs: reconnect


def job_deleted(job_name: str) -> PhaseChange:
    """The followed attempt's Job was deleted (step ``job_deleted``): the run is cancelled."""
    return PhaseChange(Phase.CANCELLED.value, "JobDeleted", f"Job {job_name} was deleted; the run is cancelled.")


def stream_opened(status: Mapping[str, Any], pod_name: str, *, written_phase: str | None,
                  now: float) -> Notice | None:
    """Pod ``pod_name``'s log stream opened, so its trainer runs: the run is ``Running`` (``PodRunning``), unless
    it is already, in ``status`` (pending changes included) or as last written (``written_phase``)."""
    if Phase.RUNNING.value in (status.get("phase"), written_phase):
        return None
    return PhaseChange(Phase.RUNNING.value, "PodRunning", f"Trainer pod {pod_name} is running.").notice(
        status, now, "Normal")


def trainer_started(status: Mapping[str, Any], now: float) -> Notice | None:
    """The trainer's ``started`` event: the run is ``Running`` (``TrainerStarted``) unless ``status`` says it is
    already."""
    if status.get("phase") == Phase.RUNNING.value:
        return None
    return PhaseChange(Phase.RUNNING.value, "TrainerStarted", "The trainer started.").notice(status, now, "Normal")


def trainer_failed(event: Event) -> dict[str, Any]:
    """Status patch for the trainer's ``failed`` event (from its log or its termination message): the run's
    message says why, until :func:`kubetune.lifecycle.outcome.attempt_outcome` judges the attempt with it."""
    return {"message": f"{event.reason or 'Failed'}: {event.message or ''}"[:MESSAGE_MAX_CHARS]}


def pod_replaced(previous: str, pod_name: str, attempt: int) -> Notice:
    """Step ``replaced``: attempt ``attempt``'s followed pod ``previous`` is gone and its Job started ``pod_name``
    instead: a Warning, and the run's message."""
    message = (f"Trainer pod {previous} of attempt {attempt} is gone; the Job started {pod_name}, which resumes "
               "from the latest checkpoint.")
    return Notice({"message": message}, "Warning", "TrainerPodReplaced", message)


def waiting_problem(pod: PodState, reported: str | None) -> Notice | None:
    """A ``wait`` step's pod waits on one of ``WAITING_PROBLEMS`` (an image that cannot be pulled, a missing
    Secret, ...): a Warning named after it, and the run's message; None when it waits on none, or on the one
    ``reported`` last (its pods are waited on every few seconds)."""
    reason = pod.waiting_reason
    if reason is None or reason not in WAITING_PROBLEMS or reason == reported:
        return None
    message = f"Trainer pod {pod.name}: {reason}: {pod.message or ''}".strip()[:MESSAGE_MAX_CHARS]
    return Notice({"message": message}, "Warning", reason, message)
