"""The operator runs under deploy/rbac.yaml alone (a service-account token, no admin rights), and that RBAC
cannot read Secrets. The Helm chart's RBAC, asked of the API server under the operator's own token
(SelfSubjectRulesReview: ``kubectl auth can-i --list``; SelfSubjectAccessReview: ``kubectl auth can-i``): no
ConfigMap verb and no Secret read anywhere, in kube-system exactly the operator's rules (cluster-wide) or no
namespaced verb at all (named namespaces), and the operator works under it."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
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
CHART = ROOT / "helm" / "kubetune"
RELEASE = "kt"
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
Grants = dict[tuple[str, str], set[str]]


def _token_kubeconfig(cluster: Any, token: str, path: Path) -> Path:
    """A kubeconfig for the cluster's API server that authenticates with ``token`` only."""
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


def _service_account_kubeconfig(cluster: Any, kube_api: Any, path: Path) -> Path:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    sa = wait_for(lambda: (s := core.read_namespaced_service_account("kubetune-operator", "kubetune-system")).secrets
                  and s, 30, "the service account's token secret")
    secret = core.read_namespaced_secret(sa.secrets[0].name, "kubetune-system")  # the test reads it, not the operator
    token = base64.b64decode((secret.data or {})["token"]).decode()
    return _token_kubeconfig(cluster, token, path)


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


# ------------------------------------------------------------------------------------------ the chart's RBAC
def _service_account_token(kube_api: Any, namespace: str, name: str) -> str:
    """A short-lived token of the ServiceAccount (TokenRequest), as the kubelet mounts into its pods."""
    from kubernetes import client

    body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    status = client.CoreV1Api(kube_api).create_namespaced_service_account_token(name, namespace, body).status
    assert status is not None
    return str(status.token)


def _flatten(rules: Any, *, kubernetes_model: bool) -> Grants:
    """(API group, resource) → verbs; a rule limited to names counts as ``resource[name,...]``."""
    grants: Grants = {}
    for rule in rules or ():
        groups = (rule.api_groups if kubernetes_model else rule.get("apiGroups")) or [""]
        resources = (rule.resources if kubernetes_model else rule.get("resources")) or []
        names = (rule.resource_names if kubernetes_model else rule.get("resourceNames")) or []
        verbs = rule.verbs if kubernetes_model else rule["verbs"]
        for group in groups:
            for resource in resources:
                key = f"{resource}[{','.join(sorted(names))}]" if names else resource
                grants.setdefault((group, key), set()).update(verbs)
    return grants


class Identity:
    """The API server's answers to one token about itself."""

    def __init__(self, cluster: Any, token: str, path: Path) -> None:
        from kubernetes import client, config

        self.kubeconfig = _token_kubeconfig(cluster, token, path)
        self.authz = client.AuthorizationV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))

    def rules(self, namespace: str) -> Grants:
        """``kubectl auth can-i --list -n NAMESPACE``."""
        from kubernetes import client

        review = self.authz.create_self_subject_rules_review(
            client.V1SelfSubjectRulesReview(spec=client.V1SelfSubjectRulesReviewSpec(namespace=namespace)))
        assert review.status is not None
        return _flatten(review.status.resource_rules, kubernetes_model=True)

    def can(self, verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
        """``kubectl auth can-i VERB RESOURCE -n NAMESPACE`` (namespace "": in every namespace)."""
        from kubernetes import client

        resource, _, subresource = resource.partition("/")
        attributes = client.V1ResourceAttributes(namespace=namespace, verb=verb, group=group, resource=resource,
                                                 subresource=subresource or None)
        review = self.authz.create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)))
        assert review.status is not None
        return bool(review.status.allowed)


@contextlib.contextmanager
def _chart_rbac(cluster: Any, kube_api: Any, release_namespace: str, values: dict[str, Any],
                tmp_path: Path) -> Iterator[tuple[Identity, Identity, list[dict[str, Any]]]]:
    """The chart's ServiceAccount and RBAC (nothing else of it) installed for a release in ``release_namespace``:
    the operator's identity, a bare identity of the same kind bound to nothing (what every account may do), and
    the rendered RBAC objects. Its cluster-scoped objects are deleted afterwards."""
    helm = pytest.importorskip("helm_python")
    from kubernetes import client

    out = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=release_namespace, is_install=True)
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d and d["kind"] in RBAC_KINDS]
    kubectl(cluster.kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    client.CoreV1Api(kube_api).create_namespaced_service_account(
        release_namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody")))
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    try:
        operator = Identity(cluster, _service_account_token(kube_api, release_namespace, account),
                            tmp_path / "operator.kubeconfig")
        nobody = Identity(cluster, _service_account_token(kube_api, release_namespace, "nobody"),
                          tmp_path / "nobody.kubeconfig")
        yield operator, nobody, docs
    finally:
        for doc in docs:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                kubectl(cluster.kubeconfig, "delete", doc["kind"].lower(), doc["metadata"]["name"],
                        "--ignore-not-found", check=False)


def _rendered(docs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> Grants:
    grants: Grants = {}
    for doc in docs:
        if doc["kind"] == kind and (namespace is None or doc["metadata"].get("namespace") == namespace):
            for key, verbs in _flatten(doc.get("rules"), kubernetes_model=False).items():
                grants.setdefault(key, set()).update(verbs)
    return grants


def _union(*grants: Grants) -> Grants:
    out: Grants = {}
    for g in grants:
        for key, verbs in g.items():
            out.setdefault(key, set()).update(verbs)
    return out


NEVER = [("configmaps", verb) for verb in ("get", "list", "watch", "create", "update", "patch", "delete",
                                           "deletecollection")] + [
    ("secrets", "get"), ("secrets", "list"), ("secrets", "watch"), ("pods", "create"), ("pods/exec", "create"),
    ("serviceaccounts/token", "create"), ("serviceaccounts", "create")]


def test_chart_rbac_cluster_wide_no_config_maps_no_secrets_and_only_the_operator_rules_in_kube_system(
        cluster: Any, kube_api: Any, crd_installed: str, namespace: str, runs: Runs, tmp_path: Path) -> None:
    with _chart_rbac(cluster, kube_api, namespace, {}, tmp_path) as (operator, nobody, docs):
        chart = _rendered(docs, "ClusterRole")
        assert ("", "configmaps") not in chart and ("", "secrets") not in chart
        everyone = nobody.rules("kube-system")
        # The API server's own list, under the operator's token: in kube-system exactly the ClusterRoles' rules
        # (what every account may do besides), and no ConfigMap or Secret rule in any namespace.
        assert operator.rules("kube-system") == _union(everyone, chart)
        for ns in ("kube-system", namespace, "default"):
            listed = operator.rules(ns)
            assert not {key for key in listed if key[1].split("[")[0] in ("configmaps", "secrets")}, (ns, listed)
        # The release namespace adds the leader-election Lease, nothing else.
        assert operator.rules(namespace) == _union(everyone, chart, _rendered(docs, "Role", namespace))
        for resource, verb in NEVER:
            for ns in ("kube-system", namespace, ""):
                assert not operator.can(verb, resource, ns), (verb, resource, ns or "every namespace")
        assert not operator.can("update", "clusterroles", group="rbac.authorization.k8s.io")
        assert not operator.can("get", "leases", "kube-system", group="coordination.k8s.io")
        assert operator.can("create", "jobs", namespace, group="batch")
        assert operator.can("patch", "finetuneruns/status", namespace, group="kubetune.io")

        # ... and the operator does its work with it: Job, status, Events, an invalid run, deletion.
        op = OperatorProcess(str(operator.kubeconfig), namespace, tmp_path / "operator.log").start()
        try:
            runs.create(run_manifest("chart-rbac", model=standin(steps=3, pace=0.1)))
            runs.create(run_manifest("chart-rbac-bad", data={"train": "s3://d/t.csv", "eval": "s3://d/e.csv",
                                                             "valSplit": 0.1}))
            wait_for(lambda: runs.jobs("chart-rbac"), 30, "the Job created under the chart's RBAC")
            wait_for(lambda: condition(runs.status("chart-rbac"), "Created").get("status") == "True", 30,
                     "status patched")
            wait_for(lambda: runs.status("chart-rbac-bad").get("phase") == "Failed", 30, "the invalid run failed")
            wait_for(lambda: any(e.reason == "JobCreated" for e in runs.events("chart-rbac")), 20, "an Event posted")
            runs.delete("chart-rbac")
            wait_for(lambda: runs.get("chart-rbac") is None, 30, "deletion through the operator's finalizer")
            log = op.log(tail=100000)
            assert "Forbidden" not in log and " 403" not in log, log[-4000:]
        finally:
            op.stop()


def test_chart_rbac_for_named_namespaces_grants_no_namespaced_verb_in_kube_system(
        cluster: Any, kube_api: Any, crd_installed: str, namespace: str, tmp_path: Path) -> None:
    values = {"operator": {"watchNamespaces": [namespace]}}
    with _chart_rbac(cluster, kube_api, namespace, values, tmp_path) as (operator, nobody, docs):
        assert not _rendered(docs, "ClusterRole").keys() - {("apiextensions.k8s.io", "customresourcedefinitions")}
        # kube-system: what every account may do, and the read-only CRD scan (cluster-scoped); nothing else
        assert operator.rules("kube-system") == _union(nobody.rules("kube-system"), _rendered(docs, "ClusterRole"))
        for verb, resource, group in (("create", "jobs", "batch"), ("list", "pods", ""), ("get", "pods/log", ""),
                                      ("create", "events", ""), ("list", "finetuneruns", "kubetune.io")):
            assert not operator.can(verb, resource, "kube-system", group=group), (verb, resource)
            assert not operator.can(verb, resource, "", group=group), (verb, resource, "every namespace")
            assert operator.can(verb, resource, namespace, group=group), (verb, resource, namespace)
        for resource, verb in NEVER:
            assert not operator.can(verb, resource, namespace), (verb, resource)
