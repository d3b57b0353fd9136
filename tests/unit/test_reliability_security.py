"""Least privilege, offline: deploy/rbac.yaml grants only the verbs and resources the operator uses, never Secrets,
and trainer pods get no API access. (The API server's own answer, ``kubectl auth can-i``, is checked in
``tests/integration/test_operator_rbac.py``; the hardened pod spec on a created Job in
``tests/integration/test_reliability_api.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# What the operator does, resource by resource (kopf's own needs included); deploy/rbac.yaml may grant no more.
OPERATOR_NEEDS: dict[tuple[str, str], set[str]] = {
    ("kubetune.io", "finetuneruns"): {"get", "list", "watch", "patch", "update"},
    ("kubetune.io", "finetuneruns/status"): {"get", "patch", "update"},
    ("kubetune.io", "finetuneruns/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete", "deletecollection", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    # leader election (kubetune.operator.leader): read, create, and renew or release with a conditional PUT
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}


def test_rbac_grants_only_what_the_operator_uses() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()) if d]
    extra: list[str] = []
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc.get("rules") or ():
            assert "*" not in rule.get("verbs", []) and "*" not in rule.get("resources", []), rule
            assert not rule.get("nonResourceURLs"), rule
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    allowed = OPERATOR_NEEDS.get((group, resource))
                    assert resource not in ("secrets", "configmaps", "pods/exec", "pods/attach",
                                            "serviceaccounts/token"), rule
                    if allowed is None:
                        extra.append(f"{doc['metadata']['name']}: {group}/{resource}")
                    else:
                        extra += [f"{doc['metadata']['name']}: {verb} {group}/{resource}"
                                  for verb in set(rule["verbs"]) - allowed]
    assert extra == [], f"deploy/rbac.yaml grants more than the operator uses: {extra}"
    # The trainer's pods get no API access: a ServiceAccount of their own (if any) is bound to nothing.
    bound = {s["name"] for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
             for s in d.get("subjects") or ()}
    trainer_accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"} - {"kubetune-operator"}
    assert not (bound & trainer_accounts), bound & trainer_accounts



def test_leader_election_role_names_the_default_lease() -> None:
    """The Lease is read and renewed by name only (a create cannot be limited to one), in the operator's own
    namespace: the name the operator uses by default."""
    from kubetune.operator.leader import DEFAULT_LEASE_NAME

    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "kubetune-operator-leader-election"]
    assert role["metadata"]["namespace"] == "kubetune-system"
    grants = {(verb, tuple(rule.get("resourceNames") or ())) for rule in role["rules"] for verb in rule["verbs"]}
    assert grants == {("create", ()), ("get", (DEFAULT_LEASE_NAME,)), ("update", (DEFAULT_LEASE_NAME,))}


def test_trainer_pods_get_no_api_token() -> None:
    from kubetune.api.spec import FinetuneRunSpec
    from kubetune.operator import manifests
    from kubetune.operator.settings import OperatorSettings

    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "ns", "uid": "u-1", "generation": 1},
           "spec": {"data": {"train": "s3://d/t.csv"}}}
    spec = FinetuneRunSpec.model_validate(run["spec"])
    for settings in (OperatorSettings(), OperatorSettings(trainer_service_account="kubetune-trainer")):
        pod = manifests.job(run, spec, settings, attempt=1)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod.get("serviceAccountName") in (None, "default", "kubetune-trainer")
