"""Bad input and least privilege against the real API server, with the operator running.

- A sample of the hypothesis-generated invalid specs (``tests/invalid_specs.py``; the offline unit test checks
  ≥ 1,000 of them) goes to the API server: schema violations are refused with 422 naming the field path,
  cross-field violations are accepted and the operator fails the run naming the path, with no Job; meanwhile a
  valid run alongside gets its Job, and the operator neither crashes nor logs a traceback.
- The Job the operator creates, read back from the API server, is hardened (non-root, read-only root
  filesystem, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, no service-account
  token, no service links). (RBAC: ``tests/unit/test_reliability_security.py`` and ``test_operator_rbac.py``.)
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

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
from tests.invalid_specs import Case, cross_cases, schema_cases

__all__ = ["crd_installed", "operator", "runs"]

pytestmark = pytest.mark.integration

N_SCHEMA, N_CROSS = 40, 10


def _manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun", "metadata": {"name": name}, "spec": spec}


def test_invalid_specs_are_refused_by_the_api_server_or_failed_by_the_operator(operator: Any, runs: Runs) -> None:
    from kubernetes.client.exceptions import ApiException

    runs.create(run_manifest("valid-before", model=standin(steps=200, pace=1.0)))
    rejected: list[float] = []
    accepted: list[Case] = []

    def send(case: Case) -> None:
        name = f"bad-{len(rejected) + len(accepted)}"
        started = time.monotonic()
        try:
            runs.create(_manifest(name, case.spec))
        except ApiException as e:
            assert case.kind == "schema", f"a cross-field case was refused by the schema: {e.body}"
            assert e.status == 422, e.body
            message = json.loads(e.body or "{}")["message"]
            # Kubernetes 1.20 names an array element by the array's path (``tolerations``, not ``tolerations[0]``).
            unindexed = re.sub(r"\[\d+\]", "", case.path)
            assert case.path in message or unindexed in message, f"{case.what}: {case.path} not in {message}"
            rejected.append(time.monotonic() - started)
            return
        assert case.kind == "cross", f"the API server accepted {case.what} at {case.path}: {case.spec}"
        accepted.append(case)

    common = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    given(schema_cases())(settings(common, max_examples=N_SCHEMA)(send))()
    given(cross_cases())(settings(common, max_examples=N_CROSS)(lambda case: send(case)))()
    runs.create(run_manifest("valid-after", model=standin(steps=200, pace=1.0)))
    assert len(rejected) >= N_SCHEMA * 0.9 and len(accepted) >= 5, (len(rejected), len(accepted))

    # The valid runs alongside are not stalled: each gets its Job.
    started = time.monotonic()
    wait_for(lambda: runs.jobs("valid-before") and runs.jobs("valid-after"), 60, "Jobs for the valid runs")
    job_after = time.monotonic() - started
    # Every accepted invalid run is Failed/InvalidSpec naming its field path, with no Job and no ConfigMap.
    for i, case in enumerate(accepted, start=len(rejected)):
        name = f"bad-{i}"
        status = runs.wait_phase(name, "Failed", 60)
        failed = condition(status, "Failed")
        assert failed["reason"] == "InvalidSpec" and case.path in failed["message"], (case.path, failed)
        assert runs.jobs(name) == [] and runs.config_maps(name) == []
    assert operator.proc.poll() is None, "the operator died"
    log = operator.log(tail=100_000)
    assert "Traceback" not in log, log[-4000:]
    print(f"{len(rejected)} refused by the API server (p50 {sorted(rejected)[len(rejected) // 2] * 1000:.0f} ms), "
          f"{len(accepted)} failed by the operator; valid run's Job {job_after:.1f}s after the flood")


def test_created_job_is_hardened(operator: Any, runs: Runs) -> None:
    runs.create(run_manifest("hardened", model=standin(steps=50, pace=1.0)))
    (job,) = wait_for(lambda: runs.jobs("hardened"), 30, "the Job")
    pod = runs.batch.api_client.sanitize_for_serialization(job)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert all("hostPath" not in v for v in pod["volumes"])
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged")
        for env in container.get("env", []):  # credentials only by reference
            assert not ("AWS_SECRET" in env["name"] and env.get("value")), env
