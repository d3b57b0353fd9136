"""Ending a run from outside its attempts: a cancel request (the ``kubetune.io/cancel-requested``
annotation) and the TTL after it finished. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION, Phase
from kubetune.lifecycle.conditions import CLEANED_UP, get_condition, is_terminal, transition
from kubetune.lifecycle.formats import parse_rfc3339


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


def ttl_due(status: Mapping[str, Any] | None, ttl_seconds: int | None, now: float) -> bool:
    """Whether the TTL after finish has passed (and children were not already cleaned up)."""
    if ttl_seconds is None or not is_terminal(status):
        return False
    cond = get_condition((status or {}).get("conditions"), CLEANED_UP)
    if cond is not None and cond.get("status") == "True":
        return False
    finished = parse_rfc3339((status or {}).get("completionTime"))
    return finished is not None and now >= finished + ttl_seconds
