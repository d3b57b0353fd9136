"""The rules for a run's course from outside its attempts (kubetune.lifecycle.policy): acceptance, the platform's
admission (allow-list, run config size), when the supervisor and the TTL timer run, suspend and resume, TTL
cleanup. Case by case, with a fake clock (``now`` is a plain float)."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api.spec import CANCEL_ANNOTATION, FinetuneRunStatus, ResourcesSpec
from kubetune.lifecycle.conditions import CLEANED_UP, RUNNING, SUSPENDED, get_condition, set_condition, transition
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.lifecycle.policy import (
    ADMITTED,
    PlatformPolicy,
    Refusal,
    accept_update,
    accepting,
    admission,
    image_allowed,
    image_pattern_problem,
    is_active,
    is_suspended,
    policy_violations,
    readmitted,
    refused_edit_update,
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
    message, update = ttl_update(status, 2, T0 + 90)
    assert message == "TTL after finish expired: deleted 2 Job(s)."
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


# ------------------------------------------------------------------------------------ admission
REGISTRY = "registry.example.com/ml"
POLICY = PlatformPolicy(images=(f"{REGISTRY}/*", "docker.io/kubetune/trainer:0.2.0", "ghcr.io/team/trainer:*"),
                        priority_classes=("batch-low", "batch-high"), toleration_keys=("nvidia.com/gpu", "spot"),
                        max_gpus=4)
TOLERATE_ALL = {"operator": "Exists"}


@pytest.mark.parametrize(("case", "resources", "policy", "violations"), [
    ("nothing set: the operator's defaults are the platform's", {}, POLICY, []),
    ("an image under an allowed path", {"image": f"{REGISTRY}/trainer:1.0"}, POLICY, []),
    ("deeper under an allowed path", {"image": f"{REGISTRY}/team/trainer@sha256:ab"}, POLICY, []),
    ("an exact image", {"image": "docker.io/kubetune/trainer:0.2.0"}, POLICY, []),
    ("any tag of an allowed repository", {"image": "ghcr.io/team/trainer:nightly"}, POLICY, []),
    ("another tag than the exact one", {"image": "docker.io/kubetune/trainer:latest"}, POLICY,
     ["spec.resources.image"]),
    ("a registry whose name starts like the allowed one", {"image": "registry.example.com.evil.io/ml/x:1"}, POLICY,
     ["spec.resources.image"]),
    ("a sibling path", {"image": "registry.example.com/ml-other/x:1"}, POLICY, ["spec.resources.image"]),
    ("the path itself is no image under it", {"image": f"{REGISTRY}/"}, POLICY, ["spec.resources.image"]),
    ("another repository than the any-tag one", {"image": "ghcr.io/team/trainer-x:1"}, POLICY,
     ["spec.resources.image"]),
    ("an allowed priority class", {"priorityClassName": "batch-low"}, POLICY, []),
    ("another priority class", {"priorityClassName": "system-cluster-critical"}, POLICY,
     ["spec.resources.priorityClassName"]),
    ("allowed taint keys", {"tolerations": [{"key": "spot", "operator": "Exists"},
                                            {"key": "nvidia.com/gpu", "operator": "Exists"}]}, POLICY, []),
    ("a control-plane toleration", {"tolerations": [{"key": "spot", "operator": "Exists"},
                                                   {"key": "node-role.kubernetes.io/control-plane",
                                                    "operator": "Exists"}]}, POLICY,
     ["spec.resources.tolerations[1].key"]),
    ("a toleration without a key tolerates every taint", {"tolerations": [TOLERATE_ALL]}, POLICY,
     ["spec.resources.tolerations[0].key"]),
    ("GPUs at the limit", {"gpus": 4}, POLICY, []),
    ("GPUs over the limit", {"gpus": 8}, POLICY, ["spec.resources.gpus"]),
    ("GPUs at the limit over two pods", {"gpus": 2, "nodes": 2}, POLICY, []),
    ("GPUs over the limit over three pods", {"gpus": 2, "nodes": 3}, POLICY, ["spec.resources.gpus"]),
    ("everything wrong at once, in field order", {"image": "evil/miner:1", "priorityClassName": "x", "gpus": 16,
                                                  "tolerations": [TOLERATE_ALL]}, POLICY,
     ["spec.resources.image", "spec.resources.priorityClassName", "spec.resources.tolerations[0].key",
      "spec.resources.gpus"]),
    ("no allow-list: anything", {"image": "evil/miner:1", "priorityClassName": "x", "gpus": 16,
                                 "tolerations": [TOLERATE_ALL]}, PlatformPolicy(), []),
    ("no GPUs at all", {"gpus": 1}, PlatformPolicy(max_gpus=0), ["spec.resources.gpus"]),
])
def test_the_platform_allow_list_names_each_field_it_refuses(case: str, resources: dict[str, Any],
                                                              policy: PlatformPolicy, violations: list[str]) -> None:
    found = policy_violations(ResourcesSpec.model_validate(resources), policy)
    assert [path for path, _ in found] == violations, case


@pytest.mark.parametrize(("resources", "reason"), [
    ({"image": "evil/miner:1"}, "image 'evil/miner:1' is not allowed; allowed: 'registry.example.com/ml/*', "
                                "'docker.io/kubetune/trainer:0.2.0', 'ghcr.io/team/trainer:*'"),
    ({"priorityClassName": "x"}, "priority class 'x' is not allowed; allowed: 'batch-low', 'batch-high'"),
    ({"tolerations": [TOLERATE_ALL]}, "a toleration without a key (every taint) is not allowed; allowed keys: "
                                      "'nvidia.com/gpu', 'spot'"),
    ({"gpus": 8}, "8 GPUs is more than the 4 allowed per run"),
])
def test_a_refusal_says_what_is_allowed(resources: dict[str, Any], reason: str) -> None:
    ((_, found),) = policy_violations(ResourcesSpec.model_validate(resources), POLICY)
    assert found == reason


@pytest.mark.parametrize(("pattern", "valid"), [
    ("registry.example.com/ml/trainer:1.0", True),
    ("registry.example.com/ml/*", True),
    ("registry.example.com/ml/trainer:*", True),
    ("registry.example.com/ml/trainer@*", True),
    ("registry.example.com*", False),  # would allow registry.example.com.attacker.io
    ("registry.example.com/ml/train*", False),
    ("*", False),
    ("/*", False),
    ("registry.example.com/*/trainer:1", False),
    ("", False),
    ("a b", False),
])
def test_only_path_tag_or_digest_wildcards_make_image_patterns(pattern: str, valid: bool) -> None:
    assert (image_pattern_problem(pattern) is None) is valid, pattern
    if valid and pattern.endswith("*"):
        assert not image_allowed(pattern[:-1], [pattern])  # the bare prefix is no image under it


@pytest.mark.parametrize(("case", "resources", "config_bytes", "reason"), [
    ("allowed, under the budget", {}, 999, None),
    ("exactly at the budget", {}, 1_000, None),
    ("over the budget", {}, 1_001, "ConfigTooLarge"),
    ("a violation is named before the size", {"gpus": 8}, 1_001, "PolicyViolation"),
])
def test_admission_checks_the_allow_list_then_the_run_config_size(case: str, resources: dict[str, Any],
                                                                  config_bytes: int, reason: str | None) -> None:
    refusal = admission(ResourcesSpec.model_validate(resources), POLICY, config_bytes=config_bytes,
                        config_limit=1_000)
    assert (refusal.reason if refusal else None) == reason, case


def test_acceptance_fails_a_refused_run_with_admitted_false_and_no_job() -> None:
    refusal = admission(ResourcesSpec.model_validate({"gpus": 8}), POLICY, config_bytes=1, config_limit=10)
    assert refusal is not None
    for suspended in (False, True):  # suspended or not, it would never be admitted
        accepted = accept_update({}, 3, invalid=None, suspended=suspended, now=T0, refusal=refusal)
        assert accepted is not None
        change, update = accepted
        assert (change.phase, change.reason) == ("Failed", "PolicyViolation")
        assert change.message == ("Not admitted (PolicyViolation): spec.resources.gpus: 8 GPUs is more than the 4 "
                                  "allowed per run")
        assert update["phase"] == "Failed" and update["observedGeneration"] == 3
        assert cond(update, ADMITTED) == ("False", "PolicyViolation", now_rfc3339(T0))
        assert get_condition(update["conditions"], ADMITTED)["message"] == change.message  # type: ignore[index]
    # an invalid spec is named as such first (its fields cannot be checked against the allow-list)
    accepted = accept_update({}, 3, invalid="spec.data: required", suspended=False, now=T0, refusal=refusal)
    assert accepted is not None and accepted[0].reason == "InvalidSpec"


def test_a_refused_edit_is_not_applied_and_an_admitted_one_clears_the_refusal() -> None:
    running = FinetuneRunStatus.model_validate({**phase("Running"), "attemptGeneration": 1})
    refusal = Refusal("PolicyViolation", (("spec.resources.gpus", "8 GPUs is more than the 4 allowed per run"),))
    update = refused_edit_update(running, 2, refusal, T0)
    assert update["message"] == ("Spec generation 2 is not admitted (PolicyViolation) and not applied: "
                                 "spec.resources.gpus: 8 GPUs is more than the 4 allowed per run. The run goes on "
                                 "with generation 1.")
    assert "observedGeneration" not in update and "phase" not in update  # the run goes on as it was
    assert cond(update, ADMITTED) == ("False", "PolicyViolation", now_rfc3339(T0))
    cleared = readmitted(update["conditions"], 3, T0 + 5)
    assert cond({"conditions": cleared}, ADMITTED) == ("True", "Admitted", now_rfc3339(T0 + 5))
    never_refused = phase("Running")["conditions"]
    assert readmitted(never_refused, 3, T0) == never_refused  # no Admitted condition where nothing was refused


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
