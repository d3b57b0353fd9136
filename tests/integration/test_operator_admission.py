"""The platform's admission against a real API server, with the operator as a subprocess: its allow-list (images,
priority classes, toleration keys, GPUs per run) from the environment the chart sets, and the run config's size.
A refused run gets ``Admitted=False`` with the field path and the allowed values, a Warning Event, and no Job; a
refused edit of a running run is not applied. An admitted run's Job carries its run config in its pod template,
shown to the trainer through a downward API volume, and no ConfigMap is written."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

from tests.integration.test_operator_support import (
    Runs,
    condition,
    crd_installed,
    operator,
    run_manifest,
    runs,
    standin,
    wait_for,
)

__all__ = ["crd_installed", "operator", "runs"]

pytestmark = pytest.mark.integration

POLICY = {"KUBETUNE_ALLOWED_IMAGES": '["registry.example.com/ml/*"]',
          "KUBETUNE_ALLOWED_PRIORITY_CLASSES": '["batch-low"]',
          "KUBETUNE_ALLOWED_TOLERATION_KEYS": '["spot"]',
          "KUBETUNE_MAX_GPUS_PER_RUN": "1"}
SMALL = {"gpus": 0, "cpu": "50m", "memory": "64Mi", "ephemeralStorage": "256Mi"}


def _events(runs: Runs, name: str, reason: str) -> list[Any]:
    return [e for e in runs.events(name) if e.reason == reason]


def _refused(runs: Runs, name: str) -> dict[str, Any]:
    status = runs.wait_phase(name, "Failed", 30)
    admitted = condition(status, "Admitted")
    assert admitted["status"] == "False", status
    return admitted


@pytest.mark.parametrize("operator", [POLICY], indirect=True)
def test_runs_outside_the_platform_allow_list_are_refused_with_the_field_and_get_no_job(operator: Any,
                                                                                       runs: Runs) -> None:
    refused = {
        "wrong-image": ({**SMALL, "image": "docker.io/someone/miner:1"}, "spec.resources.image",
                        "'registry.example.com/ml/*'"),
        "wrong-priority": ({**SMALL, "priorityClassName": "system-cluster-critical"},
                           "spec.resources.priorityClassName", "'batch-low'"),
        "tolerates-all": ({**SMALL, "tolerations": [{"operator": "Exists"}]}, "spec.resources.tolerations[0].key",
                          "'spot'"),
        "too-many-gpus": ({**SMALL, "gpus": 2}, "spec.resources.gpus", "the 1 allowed per run"),
    }
    for name, (resources, _, _) in refused.items():
        runs.create(run_manifest(name, model=standin(), resources=resources))
    runs.create(run_manifest("allowed", model=standin(), resources={
        **SMALL, "image": "registry.example.com/ml/standin:1", "priorityClassName": "batch-low",
        "tolerations": [{"key": "spot", "operator": "Exists"}]}))
    (job,) = wait_for(lambda: runs.jobs("allowed"), 30, "the allowed run's Job")
    for name, (_, path, allowed) in refused.items():
        admitted = _refused(runs, name)
        assert admitted["reason"] == "PolicyViolation", admitted
        assert admitted["message"].startswith(f"Not admitted (PolicyViolation): {path}: "), admitted
        assert allowed in admitted["message"], admitted
        warning = wait_for(functools.partial(_events, runs, name, "PolicyViolation"), 20,
                           f"the PolicyViolation Event of {name}")
        assert warning[0].type == "Warning" and path in warning[0].message
        assert runs.jobs(name) == [], name
    assert condition(runs.status("allowed"), "Admitted") == {}  # nothing refused, nothing to say
    assert job.spec.template.spec.priority_class_name == "batch-low"


@pytest.mark.parametrize("operator", [POLICY], indirect=True)
def test_an_edit_outside_the_allow_list_is_not_applied_and_a_later_admitted_edit_clears_it(operator: Any,
                                                                                            runs: Runs) -> None:
    runs.create(run_manifest("edited", model=standin(steps=500, pace=1.0), resources=SMALL))
    wait_for(lambda: condition(runs.status("edited"), "Created").get("status") == "True", 30, "the first attempt")
    runs.patch_spec("edited", {"resources": {"gpus": 4}})
    admitted = wait_for(lambda: (c := condition(runs.status("edited"), "Admitted")) and c, 30, "Admitted=False")
    assert (admitted["status"], admitted["reason"]) == ("False", "PolicyViolation")
    assert "Spec generation 2 is not admitted (PolicyViolation) and not applied: spec.resources.gpus" in (
        admitted["message"])
    wait_for(lambda: "PolicyViolation" in [e.reason for e in runs.events("edited")], 20, "the Warning Event")
    status = runs.status("edited")
    assert status["phase"] in ("Pending", "Running") and status["attempts"] == 1 and len(runs.jobs("edited")) == 1
    runs.patch_spec("edited", {"resources": {"gpus": 0}})
    wait_for(lambda: condition(runs.status("edited"), "Admitted").get("status") == "True", 30, "Admitted=True")


def test_a_run_config_too_large_for_a_pod_template_is_refused(operator: Any, runs: Runs) -> None:
    # ~230 KB: over the operator's 224 KiB for the pod template's annotations, under the run's own cap (kopf
    # keeps the spec it handled last in one of the run's annotations)
    blob = "x" * 230_000
    runs.create(run_manifest("huge", model={"name": "huge", "config": {"standin": {"steps": 1}, "blob": blob}},
                             resources=SMALL))
    admitted = _refused(runs, "huge")
    assert admitted["reason"] == "ConfigTooLarge" and "the run config is " in admitted["message"]
    assert runs.jobs("huge") == []


def test_an_admitted_run_config_travels_in_the_job_and_no_config_map_is_written(operator: Any,
                                                                                 runs: Runs) -> None:
    created = runs.create(run_manifest("in-job", model=standin(steps=7), resources=SMALL))
    (job,) = wait_for(lambda: runs.jobs("in-job"), 30, "the Job")
    template = job.spec.template
    config = json.loads(template.metadata.annotations["kubetune.io/run-config"])
    assert config["metadata"]["uid"] == created["metadata"]["uid"]
    assert config["spec"]["model"]["config"]["standin"]["steps"] == 7
    (volume,) = [v for v in template.spec.volumes if v.name == "config"]
    assert volume.config_map is None
    assert volume.downward_api.items[0].field_ref.field_path == "metadata.annotations['kubetune.io/run-config']"
    (container,) = template.spec.containers
    assert container.resources.limits["ephemeral-storage"] == "256Mi"
    (tmp,) = [v for v in template.spec.volumes if v.name == "tmp"]
    assert tmp.empty_dir.size_limit == "256Mi"
    assert runs.config_maps("in-job") == []
