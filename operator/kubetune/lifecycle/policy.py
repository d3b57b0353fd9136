"""A run's course from outside its attempts: accepting a new run, the platform's admission (its allow-list and the
run config's size), suspend and resume (``spec.runPolicy.suspend``), a cancel request (the
``kubetune.io/cancel-requested`` annotation), when the supervisor runs, and the TTL after the run finished. Pure.

The predicates take what kopf hands a handler (mappings, possibly empty): kopf evaluates them on every change of
every run, before anything is validated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION, FinetuneRunStatus, Phase, ResourcesSpec
from kubetune.api.validation import FieldError, format_errors
from kubetune.lifecycle.attempts import invalid_spec, resumed_update
from kubetune.lifecycle.conditions import CLEANED_UP, PhaseChange, get_condition, is_terminal, set_condition, transition
from kubetune.lifecycle.formats import parse_rfc3339

Toggle = Literal["suspend", "resume"]

# Admission: a valid run the platform does not let run gets ``Admitted=False`` with one of these reasons, a
# Warning Event, and no Job.
ADMITTED = "Admitted"
POLICY_VIOLATION = "PolicyViolation"
CONFIG_TOO_LARGE = "ConfigTooLarge"
# How an allowed-image pattern may end to allow more than one image: a bare trailing "*" would let
# "registry.example.com*" allow "registry.example.com.attacker.io/x".
IMAGE_WILDCARDS = ("/*", ":*", "@*")


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
                  suspended: bool, now: float,
                  refusal: Refusal | None = None) -> tuple[PhaseChange, dict[str, Any]] | None:
    """How a new run starts (see :func:`accepting`): ``Failed`` (:func:`.attempts.invalid_spec`) when its spec is
    invalid (``invalid``: the errors), no Job ever; ``Failed`` with ``Admitted=False`` when the platform does not
    admit it (``refusal``, :func:`admission`), no Job ever; ``Suspended`` when created suspended; else None (its
    supervisor starts it). With the phase change, the status patch (it marks ``generation`` observed)."""
    if invalid is not None:
        change = invalid_spec(invalid)
        update = change.update(status or {}, now)
    elif refusal is not None:
        change, update = refusal.change(), refusal.update(status, now)
    elif suspended:
        change = PhaseChange(Phase.SUSPENDED.value, "Suspended", "Created suspended; unsuspend to start.")
        update = change.update(status or {}, now)
    else:
        return None
    return change, {**update, "observedGeneration": generation}


# ------------------------------------------------------------------------------------------------ admission
@dataclasses.dataclass(frozen=True)
class PlatformPolicy:
    """What the platform lets a run ask for in ``spec.resources`` (Helm values ``platformPolicy.*``). An empty
    allow-list allows anything. The operator's own defaults (its trainer image, its GPU tolerations) are the
    platform's: :meth:`kubetune.operator.settings.OperatorSettings.platform_policy` adds them to the lists, so a
    spec with them filled in (read back from a Job) passes as the run's own did."""

    images: tuple[str, ...] = ()
    """Exact image references, or patterns ending in ``/*`` (anything under that path), ``:*`` (any tag of that
    repository) or ``@*`` (any digest of it)."""
    priority_classes: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ()
    """Taint keys a run's own tolerations may name. With a list, a toleration without a key (it tolerates every
    taint, control-plane nodes' included) is refused."""
    max_gpus: int | None = None
    """Most ``nvidia.com/gpu`` one run may request; None: no limit."""


def image_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be an allowed-image pattern (see :class:`PlatformPolicy`); None when it can."""
    if not pattern.strip() or any(c.isspace() for c in pattern):
        return "an image pattern must be non-empty, without spaces"
    if "*" not in pattern:
        return None
    if pattern.count("*") == 1 and pattern.endswith(IMAGE_WILDCARDS) and len(pattern) > 2:
        return None
    return (f"{pattern!r}: a '*' may only end the pattern, right after '/' (anything under that path), ':' (any "
            "tag) or '@' (any digest)")


def image_allowed(image: str, patterns: Iterable[str]) -> bool:
    """Whether ``image`` (as the run writes it) matches one of the allowed ``patterns``."""
    for pattern in patterns:
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            if image.startswith(prefix) and len(image) > len(prefix):
                return True
        elif image == pattern:
            return True
    return False


def _allowed(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def policy_violations(resources: ResourcesSpec, policy: PlatformPolicy) -> list[FieldError]:
    """What in a run's own ``spec.resources`` the platform does not allow, as (field path, reason) pairs whose
    reason names the allowed values. Pure."""
    errors: list[FieldError] = []
    if resources.image and policy.images and not image_allowed(resources.image, policy.images):
        errors.append(("spec.resources.image",
                       f"image {resources.image!r} is not allowed; allowed: {_allowed(policy.images)}"))
    priority = resources.priority_class_name
    if priority and policy.priority_classes and priority not in policy.priority_classes:
        errors.append(("spec.resources.priorityClassName", f"priority class {priority!r} is not allowed; allowed: "
                                                           f"{_allowed(policy.priority_classes)}"))
    if policy.toleration_keys:
        for i, toleration in enumerate(resources.tolerations):
            if (toleration.key or "") in policy.toleration_keys:
                continue
            what = f"taint key {toleration.key!r}" if toleration.key else "a toleration without a key (every taint)"
            errors.append((f"spec.resources.tolerations[{i}].key",
                           f"{what} is not allowed; allowed keys: {_allowed(policy.toleration_keys)}"))
    total = resources.gpus * resources.nodes
    if policy.max_gpus is not None and total > policy.max_gpus:
        where = "" if resources.nodes == 1 else f" ({resources.gpus} per pod x {resources.nodes} nodes)"
        errors.append(("spec.resources.gpus", f"{total} GPUs{where} is more than the {policy.max_gpus} allowed "
                                              "per run"))
    return errors


def config_size_problem(config_bytes: int, limit: int) -> FieldError | None:
    """The run config travels in its attempt's pod template annotations, which Kubernetes caps (256 KiB in all;
    ``limit`` leaves room for what admission webhooks add to a pod)."""
    if config_bytes <= limit:
        return None
    return ("spec", f"the run config is {config_bytes} bytes, more than the {limit} a trainer pod's annotations "
                    "carry; make the largest fields smaller (spec.model.config, spec.resources.nodeSelector, "
                    "callbacks.evaluation.zeroShotTemplates)")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why the platform does not admit a valid run: ``reason`` (``PolicyViolation``, ``ConfigTooLarge``) and the
    field paths with what is wrong."""

    reason: str
    errors: tuple[FieldError, ...]

    @property
    def detail(self) -> str:
        return format_errors(list(self.errors))

    @property
    def message(self) -> str:
        return f"Not admitted ({self.reason}): {self.detail}"

    def change(self) -> PhaseChange:
        """The run fails: nothing the platform refuses ever gets a Job."""
        return PhaseChange(Phase.FAILED.value, self.reason, self.message)

    def update(self, status: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
        """The status patch failing the run, with ``Admitted=False``."""
        patch = self.change().update(status or {}, now)
        patch["conditions"] = set_condition(patch["conditions"], ADMITTED, "False", self.reason, self.message, now)
        return patch


def admission(resources: ResourcesSpec, policy: PlatformPolicy, *, config_bytes: int,
              config_limit: int) -> Refusal | None:
    """Whether the platform admits a valid run, applied when the run is accepted and before each attempt's Job:
    None when it does, else the :class:`Refusal` (policy violations first: they are what the user must change)."""
    violations = policy_violations(resources, policy)
    if violations:
        return Refusal(POLICY_VIOLATION, tuple(violations))
    too_large = config_size_problem(config_bytes, config_limit)
    if too_large is not None:
        return Refusal(CONFIG_TOO_LARGE, (too_large,))
    return None


def refused_edit_update(status: FinetuneRunStatus, generation: int | None, refusal: Refusal,
                        now: float) -> dict[str, Any]:
    """Status patch for an edit of an active run that the platform does not admit: like an invalid edit it is not
    applied (the run goes on with the spec its attempts run with), and ``Admitted=False`` says why."""
    running = status.attempt_generation if status.attempt_generation is not None else "last admitted"
    message = (f"Spec generation {generation} is not admitted ({refusal.reason}) and not applied: {refusal.detail}. "
               f"The run goes on with generation {running}.")
    return {"message": message, "conditions": set_condition(
        [c.dump() for c in status.conditions], ADMITTED, "False", refusal.reason, message, now)}


def readmitted(conditions: Iterable[Mapping[str, Any]], generation: int | None, now: float) -> list[dict[str, Any]]:
    """After an admitted edit, an ``Admitted=False`` left by an earlier refused edit turns True."""
    prior = get_condition(conditions, ADMITTED)
    if prior is None or prior.get("status") == "True":
        return [dict(c) for c in conditions]
    return set_condition(conditions, ADMITTED, "True", "Admitted", f"Spec generation {generation} is admitted.", now)


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


def ttl_update(status: Mapping[str, Any] | None, deleted_jobs: int, now: float) -> tuple[str, dict[str, Any]]:
    """Once the TTL's cleanup deleted the run's Jobs (each carries its attempt's run config): its message, and the
    status patch (``CleanedUp=True``: the timer stops; the run and its artifact stay)."""
    message = f"TTL after finish expired: deleted {deleted_jobs} Job(s)."
    return message, {"conditions": set_condition((status or {}).get("conditions") or [], CLEANED_UP, "True",
                                                 "TTLExpired", message, now)}
