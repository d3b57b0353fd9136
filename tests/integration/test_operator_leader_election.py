"""Two operator replicas against a real API server, electing a leader on a Lease in the test's namespace: exactly one
reconciles, the other stands by; a SIGKILLed leader is replaced within the lease duration, without duplicate
Jobs; a leader whose Lease is taken exits non-zero; a SIGTERMed leader releases the Lease. Also: a standalone
operator touches no Lease, and deploy/rbac.yaml grants the election exactly its Lease."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_operator_support import (
    ROOT,
    OperatorProcess,
    Runs,
    crd_installed,
    kubectl,
    run_manifest,
    runs,
    standin,
    wait_for,
)

__all__ = ["crd_installed", "runs"]  # fixtures re-exported for pytest

pytestmark = pytest.mark.integration

LEASE = "kubetune-operator"
TAKEOVER_LIMIT = 30.0  # lease duration (15 s) + a retry period + kopf's start, with room for a loaded machine


@pytest.fixture
def replicas(cluster: Any, namespace: str, crd_installed: str, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[list[OperatorProcess]]:
    failed_before = request.session.testsfailed
    ops = [OperatorProcess(cluster.kubeconfig, namespace, tmp_path / f"operator-{i}.log", lease_namespace=namespace)
           for i in range(2)]
    try:
        for op in ops:
            op.start(ready=False)
        yield ops
    finally:
        for op in ops:
            op.stop(signal.SIGKILL)
        if request.session.testsfailed > failed_before:
            for i, op in enumerate(ops):
                sys.stderr.write(f"\n--- operator {i} log ({namespace}) ---\n{op.log(tail=60)}\n")


def leader_and_standby(ops: list[OperatorProcess]) -> tuple[OperatorProcess, OperatorProcess]:
    """Wait until exactly one replica is ready; the other must answer 503 standby at that moment."""
    def split() -> tuple[OperatorProcess, OperatorProcess] | None:
        answers = [op.answer("/readyz") for op in ops]
        leaders = [op for op, (code, _) in zip(ops, answers, strict=True) if code == 200]
        standbys = [op for op, answer in zip(ops, answers, strict=True) if answer == (503, "standby")]
        return (leaders[0], standbys[0]) if len(leaders) == 1 and len(standbys) == 1 else None

    found: tuple[OperatorProcess, OperatorProcess] = wait_for(split, 40, "one leader and one standby")
    return found


def lease(kube_api: Any, namespace: str) -> dict[str, Any]:
    from kubernetes import client

    spec = client.CoordinationV1Api(kube_api).read_namespaced_lease(LEASE, namespace).spec
    assert spec is not None
    return {"holder": spec.holder_identity or "", "transitions": spec.lease_transitions,
            "duration": spec.lease_duration_seconds}


def test_one_leader_reconciles_and_a_standby_takes_over_after_sigkill(
        replicas: list[OperatorProcess], runs: Runs, kube_api: Any, namespace: str) -> None:
    leader, standby = leader_and_standby(replicas)
    assert leader.answer("/readyz") == (200, "leader")
    assert standby.answer("/healthz")[0] == 200  # a standby is alive, only not ready
    assert lease(kube_api, namespace)["duration"] == 15

    runs.create(run_manifest("ha1", model=standin(steps=1000, pace=1.0)))
    wait_for(lambda: runs.jobs("ha1"), 30, "the first run's Job")
    assert [j.metadata.name for j in runs.jobs("ha1")] == ["ha1-a1"]
    assert 'kubetune_jobs_created_total{reason="initial"} 1.0' in leader.metrics()
    assert 'kubetune_jobs_created_total{reason="initial"}' not in standby.metrics()  # kopf never ran there

    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)
    wait_for(standby.ready, TAKEOVER_LIMIT, "the standby to lead (/readyz 200)", interval=0.1)
    takeover = time.monotonic() - killed_at
    assert takeover < TAKEOVER_LIMIT, takeover
    assert standby.answer("/readyz") == (200, "leader")
    assert lease(kube_api, namespace)["transitions"] >= 1

    runs.create(run_manifest("ha2", model=standin(steps=1000, pace=1.0)))
    wait_for(lambda: runs.jobs("ha2"), 30, "the second run's Job, created by the new leader")
    # The new leader has taken the first run over (its supervisor resumed it) by the time both are in its
    # run table; the first run still has its one Job.
    wait_for(lambda: all(f'name="{n}"' in standby.metrics() for n in ("ha1", "ha2")), 30,
             "both runs in the new leader's metrics")
    assert [j.metadata.name for j in runs.jobs("ha1")] == ["ha1-a1"]
    assert [j.metadata.name for j in runs.jobs("ha2")] == ["ha2-a1"]
    assert 'kubetune_jobs_created_total{reason="initial"} 1.0' in standby.metrics()  # ha2 only
    print(f"takeover after SIGKILL: {takeover:.1f}s")


def test_a_leader_whose_lease_is_taken_exits_and_sigterm_releases(
        replicas: list[OperatorProcess], kube_api: Any, namespace: str) -> None:
    from kubernetes import client

    leases = client.CoordinationV1Api(kube_api)
    leader, standby = leader_and_standby(replicas)

    # Another holder writes the Lease (as a partitioned leader's successor would): the leader stops and exits 1.
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    leases.patch_namespaced_lease(LEASE, namespace, {"spec": {"holderIdentity": "intruder", "renewTime": now,
                                                              "leaseDurationSeconds": 15}})
    proc = leader.proc
    assert proc is not None
    wait_for(lambda: proc.poll() is not None, 20, "the deposed leader to exit")
    assert proc.returncode == 1, leader.log()
    assert not standby.ready()  # the intruder's term runs; nobody else leads meanwhile

    # The intruder never renews: the standby takes over once its term has passed.
    wait_for(standby.ready, TAKEOVER_LIMIT, "the standby to lead after the intruder's term")
    assert lease(kube_api, namespace)["holder"] != "intruder"

    # SIGTERM: kopf stops, the Lease is released (empty holder) and the process exits 0.
    assert standby.stop(signal.SIGTERM) == 0, standby.log()
    assert lease(kube_api, namespace)["holder"] == ""
    assert "Released Lease" in standby.log(tail=400)


def test_standalone_is_ready_at_once_and_needs_no_lease(cluster: Any, crd_installed: str, namespace: str,
                                                        kube_api: Any, tmp_path: Path) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()  # waits for /readyz
    try:
        assert op.answer("/readyz") == (200, "leader") and op.answer("/healthz") == (200, "ok")
        with pytest.raises(ApiException) as missing:
            client.CoordinationV1Api(kube_api).read_namespaced_lease(LEASE, namespace)
        assert missing.value.status == 404
    finally:
        assert op.stop() == 0


def test_deploy_rbac_grants_the_election_its_lease_only(cluster: Any) -> None:
    sa = "system:serviceaccount:kubetune-system:kubetune-operator"
    kubectl(cluster.kubeconfig, "create", "namespace", "kubetune-system", check=False)
    kubectl(cluster.kubeconfig, "apply", "-f", str(ROOT / "deploy" / "rbac.yaml"))
    leases = "leases.coordination.k8s.io"
    for verb, resource, namespace, expected in (
            ("create", leases, "kubetune-system", "yes"),
            ("get", f"{leases}/{LEASE}", "kubetune-system", "yes"),
            ("update", f"{leases}/{LEASE}", "kubetune-system", "yes"),
            ("update", f"{leases}/another-lease", "kubetune-system", "no"),
            ("delete", f"{leases}/{LEASE}", "kubetune-system", "no"),
            ("list", leases, "kubetune-system", "no"),
            ("create", leases, "default", "no")):
        answer = kubectl(cluster.kubeconfig, "auth", "can-i", verb, resource, "-n", namespace, "--as", sa,
                         check=False).stdout.strip()
        assert answer == expected, (verb, resource, namespace, answer)
