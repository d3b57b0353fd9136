"""The operator runs under deploy/rbac.yaml alone (a service-account token, no admin rights), and that RBAC
cannot read Secrets."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_operator_support import (
    ROOT,
    OperatorProcess,
    Runs,
    condition,
    crd_installed,
    kubectl,
    run_manifest,
    runs,
    standin,
    wait_for,
)

__all__ = ["crd_installed", "runs"]

pytestmark = pytest.mark.integration

SA = "system:serviceaccount:kubetune-system:kubetune-operator"


def _service_account_kubeconfig(cluster: Any, kube_api: Any, path: Path) -> Path:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    sa = wait_for(lambda: (s := core.read_namespaced_service_account("kubetune-operator", "kubetune-system")).secrets
                  and s, 30, "the service account's token secret")
    secret = core.read_namespaced_secret(sa.secrets[0].name, "kubetune-system")  # the test reads it, not the operator
    token = base64.b64decode((secret.data or {})["token"]).decode()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    current = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = next(c for c in admin["clusters"] if c["name"] == current["cluster"])["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "op",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "c", "user": "op"}}],
    }))
    return path


def test_operator_works_with_least_privilege_rbac(cluster: Any, kube_api: Any, crd_installed: str,
                                                 namespace: str, runs: Runs, tmp_path: Path) -> None:
    kubectl(cluster.kubeconfig, "create", "namespace", "kubetune-system", check=False)
    kubectl(cluster.kubeconfig, "apply", "-f", str(ROOT / "deploy" / "rbac.yaml"))
    for verb, resource in (("get", "secrets"), ("list", "secrets"), ("watch", "secrets"), ("create", "pods"),
                           ("delete", "finetuneruns.kubetune.io"), ("create", "finetuneruns.kubetune.io")):
        answer = kubectl(cluster.kubeconfig, "auth", "can-i", verb, resource, "-n", namespace, "--as", SA,
                         check=False).stdout.strip()
        assert answer == "no", (verb, resource, answer)
    for verb, resource in (("create", "jobs.batch"), ("get", "pods/log"),
                           ("patch", "finetuneruns.kubetune.io/status")):
        answer = kubectl(cluster.kubeconfig, "auth", "can-i", verb, resource, "-n", namespace, "--as", SA,
                         check=False).stdout.strip()
        assert answer == "yes", (verb, resource, answer)

    kubeconfig = _service_account_kubeconfig(cluster, kube_api, tmp_path / "sa.kubeconfig")
    op = OperatorProcess(str(kubeconfig), namespace, tmp_path / "operator.log").start()
    try:
        runs.create(run_manifest("rbac", model=standin(steps=3, pace=0.1)))
        runs.create(run_manifest("rbac-bad", data={"train": "s3://d/t.csv", "eval": "s3://d/e.csv",
                                                   "valSplit": 0.1}))
        wait_for(lambda: runs.jobs("rbac"), 30, "the Job created under the operator's RBAC")
        wait_for(lambda: condition(runs.status("rbac"), "Created").get("status") == "True", 30, "status patched")
        wait_for(lambda: runs.status("rbac-bad").get("phase") == "Failed", 30, "the invalid run failed")
        wait_for(lambda: any(e.reason == "JobCreated" for e in runs.events("rbac")), 20, "an Event posted")
        runs.delete("rbac")
        wait_for(lambda: runs.get("rbac") is None, 30, "deletion through the operator's finalizer")
        time.sleep(1)
        log = op.log(tail=100000)
        assert "Forbidden" not in log and " 403" not in log, log[-4000:]
    finally:
        op.stop()
