"""Conditions and phase transitions: which conditions a phase sets, and when ``lastTransitionTime`` moves. Pure.

At most ``MAX_CONDITIONS`` conditions; reasons are cut at 128 characters, messages at ``MESSAGE_MAX_CHARS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from kubetune.api.spec import TERMINAL_PHASES, Phase
from kubetune.lifecycle.formats import clip, now_rfc3339

MAX_CONDITIONS = 16
_REASON_MAX = 128
#: An Event's message is cut at its end here: kopf would cut a longer one in its middle.
EVENT_MESSAGE_MAX_CHARS = 1024

# Condition types.
CREATED = "Created"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CANCELLED = "Cancelled"
CLEANED_UP = "CleanedUp"
JOB_CREATE_FAILED = "JobCreateFailed"  # the API server refused the attempt's Job (message: its answer)
SPEC_VALID = "SpecValid"  # False after an invalid spec edit: the run goes on with its last valid spec
# Condition types that describe the phase: exactly the one matching the phase is True.
_PHASE_CONDITION = {
    Phase.RUNNING.value: RUNNING,
    Phase.SUSPENDED.value: SUSPENDED,
    Phase.SUCCEEDED.value: SUCCEEDED,
    Phase.FAILED.value: FAILED,
    Phase.CANCELLED.value: CANCELLED,
}


def set_condition(conditions: Iterable[Mapping[str, Any]], type_: str, status: str, reason: str,
                  message: str | None, now: float) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set. ``lastTransitionTime`` changes only when status changes."""
    out = [dict(c) for c in conditions]
    new = {"type": type_, "status": status, "reason": reason[:_REASON_MAX],
           "message": clip(message) or "", "lastTransitionTime": now_rfc3339(now)}
    for i, cond in enumerate(out):
        if cond.get("type") == type_:
            if cond.get("status") == status:
                new["lastTransitionTime"] = cond.get("lastTransitionTime") or new["lastTransitionTime"]
            out[i] = new
            break
    else:
        out.append(new)
    return out[-MAX_CONDITIONS:]


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def transition(status: Mapping[str, Any], phase: str, reason: str, message: str | None,
               now: float) -> dict[str, Any]:
    """Patch for moving to ``phase``: phase, message, phase conditions, start/completion times."""
    conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or ()]
    for ph, ctype in _PHASE_CONDITION.items():
        prior = get_condition(conditions, ctype)
        if ph == phase:
            conditions = set_condition(conditions, ctype, "True", reason, message, now)
        elif prior is not None and prior.get("status") == "True":
            conditions = set_condition(conditions, ctype, "False", reason, message, now)
    if phase == Phase.RUNNING.value or phase in TERMINAL_PHASES:
        restarting = get_condition(conditions, RESTARTING)
        if restarting is not None and restarting.get("status") == "True":
            conditions = set_condition(conditions, RESTARTING, "False", reason, message, now)
    patch: dict[str, Any] = {"phase": phase, "message": clip(message), "conditions": conditions}
    if phase == Phase.RUNNING.value and not status.get("startTime"):
        patch["startTime"] = now_rfc3339(now)
    if phase in TERMINAL_PHASES:
        patch["completionTime"] = now_rfc3339(now)
    return patch


EventType = Literal["Normal", "Warning"]


@dataclasses.dataclass(frozen=True)
class Notice:
    """A status patch to write and the Event (``event_type``, ``reason``, ``message``) that tells it."""

    update: dict[str, Any]
    event_type: EventType
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class PhaseChange:
    """A move to ``phase``: ``reason`` and ``message`` go on the phase's condition, the run's message and the
    Event that says it (the Event gets ``message`` itself: the status holds it clipped)."""

    phase: str
    reason: str
    message: str

    def update(self, status: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The status patch (:func:`transition`)."""
        return transition(status, self.phase, self.reason, self.message, now)

    def notice(self, status: Mapping[str, Any], now: float, event_type: EventType) -> Notice:
        """The status patch with the Event that says it."""
        return Notice(self.update(status, now), event_type, self.reason, self.message[:EVENT_MESSAGE_MAX_CHARS])


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    """Succeeded, Failed and Cancelled are final: nothing (a restart, an unsuspend) starts the run again."""
    return bool(status) and (status or {}).get("phase") in TERMINAL_PHASES
