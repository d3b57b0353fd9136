"""A run's course from outside its attempts: accepting a new run, suspend and resume
(``spec.runPolicy.suspend``), a cancel request (the ``kubetune.io/cancel-requested`` annotation), when the
supervisor runs, and the TTL after the run finished. Pure.

The predicates take what kopf hands a handler (mappings, possibly empty): kopf evaluates them on every change of
every run, before anything is validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION, FinetuneRunStatus, Phase
from kubetune.lifecycle.attempts import invalid_spec, resumed_update
from kubetune.lifecycle.conditions import CLEANED_UP, PhaseChange, get_condition, is_terminal, set_condition, transition
from kubetune.lifecycle.formats import parse_rfc3339

Toggle = Literal["suspend", "resume"]


def run_policy(spec: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (spec or {}).get("runPolicy") or {}


def is_suspended(spec: Mapping[str, Any] | None) -> bool:
    return bool(run_policy(spec).get("suspend"))


def is_active(spec: Mapping[str, Any] | None, status: Mapping[str, Any] | None,
              meta: Mapping[str, Any] | None) -> bool:
    """Whether the run's supervisor runs: it has not ended, is not suspended and no cancel was requested."""
    return not is_terminal(status) and not is_suspended(spec) and cancel_request(meta) is None


def accepting(status: Mapping[str, Any] | None, meta: Mapping[str, Any] | None) -> bool:
    """Whether a run seen (created, or again after an operator restart) is new: it has no phase yet and no
    cancel was requested (the ``cancel`` handler takes such a run over)."""
    return not (status or {}).get("phase") and cancel_request(meta) is None


def accept_update(status: Mapping[str, Any] | None, generation: int | None, *, invalid: str | None,
                  suspended: bool, now: float) -> tuple[PhaseChange, dict[str, Any]] | None:
    """How a new run starts (see :func:`accepting`): ``Failed`` (:func:`.attempts.invalid_spec`) when its spec is
    invalid (``invalid``: the errors), no Job ever; ``Suspended`` when created suspended; else None (its
    supervisor starts it). With the phase change, the status patch (it marks ``generation`` observed)."""
    if invalid is not None:
        change = invalid_spec(invalid)
    elif suspended:
        change = PhaseChange(Phase.SUSPENDED.value, "Suspended", "Created suspended; unsuspend to start.")
    else:
        return None
    return change, {**change.update(status or {}, now), "observedGeneration": generation}


def suspend_toggle(old: Any, new: Any, status: Mapping[str, Any] | None,
                   meta: Mapping[str, Any] | None) -> Toggle | None:
    """What a change of ``spec.runPolicy.suspend`` from ``old`` to ``new`` does: suspend or resume the run;
    nothing when it did not flip, when the field is first seen (``old`` None: the run's creation, which
    :func:`accept_update` covers), when the run has ended, or when a cancel was requested (the cancel owns the
    run)."""
    if old is None or bool(old) == bool(new) or is_terminal(status) or cancel_request(meta) is not None:
        return None
    return "suspend" if new else "resume"


def suspend_update(status: Mapping[str, Any] | None, deleted_jobs: int, now: float) -> dict[str, Any]:
    """Status patch suspending the run, once its ``deleted_jobs`` Jobs are deleted (checkpoints are kept)."""
    return transition(status or {}, Phase.SUSPENDED.value, "Suspended",
                      f"Suspended: deleted {deleted_jobs} Job(s); checkpoints are kept.", now)


def resume_update(status: FinetuneRunStatus, now: float) -> dict[str, Any]:
    """Status patch when the run is unsuspended: the suspension ends (:func:`.attempts.resumed_update`); the
    phase stays until the supervisor records its next attempt, which resumes from the latest checkpoint."""
    return resumed_update(status, [c.dump() for c in status.conditions], now)


def cancel_request(meta: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``{"at": ..., "by": ...}`` (values possibly empty) when the run carries the cancel annotation."""
    annotations = (meta or {}).get("annotations") or {}
    if CANCEL_ANNOTATION not in annotations:
        return None
    return {"at": str(annotations.get(CANCEL_ANNOTATION) or "").strip(),
            "by": str(annotations.get(CANCEL_BY_ANNOTATION) or "").strip()}


def cancel_pending(meta: Mapping[str, Any] | None, status: Mapping[str, Any] | None) -> bool:
    """Whether the operator must cancel the run now: it carries the cancel annotation and has not ended.

    A run that ended (Succeeded/Failed/Cancelled) keeps its phase; a cancelled run is terminal, so nothing
    (resume after an operator restart, unsuspending) starts it again."""
    return cancel_request(meta) is not None and not is_terminal(status)


def cancel_update(status: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, deleted_jobs: int,
                  now: float) -> dict[str, Any]:
    """Status patch ending the run ``Cancelled`` (reason ``Cancelled``, completionTime)."""
    request = cancel_request(meta) or {"at": "", "by": ""}
    who = f" by {request['by']}" if request["by"] else ""
    when = f" at {request['at']}" if request["at"] else ""
    message = (f"Cancelled{who}{when} ({CANCEL_ANNOTATION}): deleted {deleted_jobs} Job(s); checkpoints are "
               "kept; the run is never re-launched.")
    return transition(status or {}, Phase.CANCELLED.value, "Cancelled", message, now)


def ttl_after_finished(spec: Mapping[str, Any] | None) -> Any:
    """``spec.runPolicy.ttlSecondsAfterFinished`` as the run holds it (None: no TTL)."""
    return run_policy(spec).get("ttlSecondsAfterFinished")


def _cleanup_pending(status: Mapping[str, Any] | None) -> bool:
    """The run has ended and its children were not cleaned up yet."""
    cleaned = (get_condition((status or {}).get("conditions"), CLEANED_UP) or {}).get("status") == "True"
    return is_terminal(status) and not cleaned


def ttl_pending(spec: Mapping[str, Any] | None, status: Mapping[str, Any] | None) -> bool:
    """Whether the TTL timer runs: the run has a TTL, has ended, and its children were not cleaned up yet."""
    return ttl_after_finished(spec) is not None and _cleanup_pending(status)


def ttl_due(status: Mapping[str, Any] | None, ttl_seconds: int | None, now: float) -> bool:
    """Whether the TTL after finish has passed (and children were not already cleaned up)."""
    if ttl_seconds is None or not _cleanup_pending(status):
        return False
    finished = parse_rfc3339((status or {}).get("completionTime"))
    return finished is not None and now >= finished + ttl_seconds


def ttl_update(status: Mapping[str, Any] | None, deleted_jobs: int, deleted_config_maps: int,
               now: float) -> tuple[str, dict[str, Any]]:
    """Once the TTL's cleanup deleted the run's Jobs and ConfigMaps: its message, and the status patch
    (``CleanedUp=True``: the timer stops; the run and its artifact stay)."""
    message = f"TTL after finish expired: deleted {deleted_jobs} Job(s) and {deleted_config_maps} ConfigMap(s)."
    return message, {"conditions": set_condition((status or {}).get("conditions") or [], CLEANED_UP, "True",
                                                 "TTLExpired", message, now)}
