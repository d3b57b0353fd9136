"""The Helm chart, linted and rendered by the real Helm library (helm-python-sdk), default and non-default values;
its values schema; its CRD copies; its Grafana dashboards' structure and the metric names they use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
RELEASE, NS = "kt", "kubetune-system"

# Metrics the dashboards use that come from other exporters.
EXTERNAL_METRICS = {"up"}
DCGM = re.compile(r"^DCGM_FI_")
# Metrics the chart engineer asked of the operator for the dashboards; it exports them all now, and
# test_requested_operator_metrics_exported (and the e2e dashboard test) enforce them.
REQUESTED_FROM_OPERATOR = {
    "kubetune_run_info": "per-run info {namespace,name,phase,model} = 1 (tables of active and failed runs)",
    "kubetune_run_eta_seconds": "status.progress.etaSeconds per run",
    "kubetune_run_val_loss": "status.metrics.valLoss per run",
    "kubetune_run_evaluation": "status.metrics.before/after per run {stage,metric}",
    "kubetune_reconcile_errors_total": "handler errors {handler}, initialised at 0 per handler",
    "process_cpu_seconds_total": "prometheus_client ProcessCollector on the operator's registry",
    "process_resident_memory_bytes": "prometheus_client ProcessCollector on the operator's registry",
    "kubetune_run_pod_info": "per-run trainer pod {namespace,name,pod} = 1 (GPU panels join DCGM by pod name)",
    "kubetune_run_phase_start_time_seconds": "when a run entered its phase {namespace,name,phase} (Pending alert)",
    "kubetune_run_last_progress_time_seconds": "when a Running run's step last moved (stalled-run alert)",
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values or {}, name=RELEASE, namespace=NS, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    out = helm.Chart.load(CHART).render(values or {}, name=RELEASE, namespace=NS, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


NON_DEFAULT: dict[str, Any] = {
    "operator": {"watchNamespaces": ["team-a", "team-b"], "replicas": 2, "logFormat": "json", "verbose": True,
                 "image": {"repository": "registry.example/kubetune-operator", "tag": "1.2.3",
                           "pullPolicy": "Always"}},
    "runDefaults": {"trainer": {"image": "registry.example/trainer:9"},
                    "s3": {"endpoint": "http://s3.example:9000", "bucket": "ml-artifacts", "secretName": "s3creds",
                           "createSecret": True, "accessKey": "AK", "secretKey": "SK"},
                    "models": {"mirror": "s3://ml-artifacts/mirror"},
                    "gpu": {"nodeSelector": {"nvidia.com/gpu.present": "true"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                             "effect": "NoSchedule"}]}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml"}}},
    "grafana": {"dashboards": {"namespace": "monitoring"}},
    "minio": {"enabled": True},
}


SECURITY: dict[str, Any] = {
    "operator": {"watchNamespaces": ["team-a", "team-b"]},
    "runDefaults": {"trainer": {"image": "registry.example.com/ml/trainer:2", "ephemeralStorage": "50Gi"},
                    "gpu": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    "platformPolicy": {"allowedImages": ["registry.example.com/ml/*", "ghcr.io/team/trainer:*"],
                       "allowedPriorityClasses": ["batch-low", "batch-high"], "allowedTolerationKeys": ["spot"],
                       "maxGpusPerRun": 4},
    "networkPolicy": {"enabled": True, "objectStore": {"cidrs": ["10.20.0.0/16", "192.168.7.10/32"],
                                                       "ports": [443, 9000]},
                      "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}],
                                       "ports": [{"protocol": "TCP", "port": 5000}]}]},
}


# ------------------------------------------------------------------------------------------ lint
@pytest.mark.parametrize("values", [{}, NON_DEFAULT, {"operator": {"watchNamespaces": ["team-*"]}},
                                    {"leaderElection": {"enabled": False}, "rbac": {"crdScanning": False},
                                     "grafana": {"dashboards": {"enabled": False}}}, SECURITY],
                         ids=["default", "non-default", "glob", "minimal", "security"])
def test_lint_strict_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version="v1.20.2", namespace=NS)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


# ------------------------------------------------------------------------------------------ defaults
def test_default_render_operator_deployment() -> None:
    docs = render()
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "kt-kubetune" and dep["metadata"]["namespace"] == NS
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kt-kubetune"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["image"] == "kubetune/operator:0.1.0"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}  # only the leader is Ready
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["args"][:3] == ["--metrics-port=8080", "--health-port=8081", "--log-format=full"]
    assert "--all-namespaces" in c["args"] and "--leader-election-id=kt-kubetune" in c["args"]
    assert "--standalone" not in c["args"] and not any(a.startswith("--peering") for a in c["args"])
    env = env_of(c)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "kubetune/trainer:0.1.0"
    assert env["KUBETUNE_S3_BUCKET"] == "kubetune" and env["KUBETUNE_S3_SECRET"] == "kubetune-s3"
    assert env["KUBETUNE_S3_ENDPOINT"] == ""
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}  # the Lease's namespace
    assert "KUBETUNE_GPU_NODE_SELECTOR" not in env


def test_default_env_is_what_the_operator_reads() -> None:
    """Every KUBETUNE_* variable the chart sets parses with the operator's own settings reader."""
    from kubetune.operator.settings import ENV_PREFIX, OperatorSettings

    env = {k: v for k, v in env_of(one(render(NON_DEFAULT), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]
                                   ["containers"][0]).items() if isinstance(v, str)}
    settings = OperatorSettings.from_env(env)
    assert settings.trainer_image == "registry.example/trainer:9"
    assert settings.s3_endpoint == "http://s3.example:9000" and settings.s3_bucket == "ml-artifacts"
    assert settings.s3_secret == "s3creds"
    assert dict(settings.gpu_node_selector) == {"nvidia.com/gpu.present": "true"}
    assert [dict(t) for t in settings.gpu_tolerations] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]
    known = {ENV_PREFIX + f.upper() for f in OperatorSettings.model_fields}
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - known
    assert not unknown, f"the chart sets variables the operator does not read: {unknown}"
    default_env = {k: v for k, v in env_of(one(render(), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]
                                           ["containers"][0]).items() if isinstance(v, str)}
    assert OperatorSettings.from_env(default_env) == OperatorSettings()  # the chart's defaults are the operator's


def test_gpu_defaults_reach_gpu_jobs() -> None:
    """The chart's runDefaults.gpu, read by the operator, end up on the Jobs of runs that request GPUs."""
    from kubetune.api.spec import FinetuneRunSpec
    from kubetune.operator import manifests
    from kubetune.operator.settings import OperatorSettings

    env = {k: v for k, v in env_of(one(render(NON_DEFAULT), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]
                                   ["containers"][0]).items() if isinstance(v, str)}
    settings = OperatorSettings.from_env(env)
    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "team-a", "uid": "u"}}
    spec = FinetuneRunSpec.model_validate({"data": {"train": "s3://d/t.csv"}, "resources": {"gpus": 1}})
    pod = manifests.job(run, spec, settings, attempt=1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == NON_DEFAULT["runDefaults"]["gpu"]["nodeSelector"]
    assert pod["tolerations"] == NON_DEFAULT["runDefaults"]["gpu"]["tolerations"]


def test_model_mirror_reaches_trainer_pods() -> None:
    """The chart's runDefaults.models.mirror, read by the operator, is every trainer's KUBETUNE_MODEL_MIRROR."""
    from kubetune.api.spec import FinetuneRunSpec
    from kubetune.operator import manifests
    from kubetune.operator.settings import OperatorSettings

    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "team-a", "uid": "u"}}
    spec = FinetuneRunSpec.model_validate({"data": {"train": "s3://d/t.csv"}})
    for values, mirror in ((NON_DEFAULT, "s3://ml-artifacts/mirror"), ({}, None)):
        operator_env = {k: v for k, v in env_of(one(render(values), "Deployment", "kt-kubetune")["spec"]["template"]
                                                ["spec"]["containers"][0]).items() if isinstance(v, str)}
        job = manifests.job(run, spec, OperatorSettings.from_env(operator_env), attempt=1)
        assert env_of(job["spec"]["template"]["spec"]["containers"][0]).get("KUBETUNE_MODEL_MIRROR") == mirror


def test_default_rbac_cluster_wide_and_least_privilege() -> None:
    docs = render()
    roles = find(docs, "ClusterRole")
    names = {r["metadata"]["name"] for r in roles}
    # cluster-scoped objects carry release namespace + name: two releases never collide
    assert names == {f"{NS}-kt-kubetune", f"{NS}-kt-kubetune-crd-scan"}
    assert [r["metadata"]["name"] for r in find(docs, "Role")] == ["kt-kubetune-leader-election"]
    main = one(docs, "ClusterRole", f"{NS}-kt-kubetune")
    resources = {(g, r) for rule in main["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("", "secrets") not in resources, "the operator never reads Secrets"
    assert ("", "pods/log") in resources and ("batch", "jobs") in resources
    assert ("kubetune.io", "finetuneruns/status") in resources
    for rule in main["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if rule["resources"] == ["pods"]:
            assert set(rule["verbs"]) == {"get", "list", "watch"}
    binding = one(docs, "ClusterRoleBinding", f"{NS}-kt-kubetune")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": NS}]
    assert not {(g, r) for rule in main["rules"] for g in rule["apiGroups"] for r in rule["resources"]} & {
        ("coordination.k8s.io", "leases"), ("kopf.dev", "kopfpeerings"), ("kopf.dev", "clusterkopfpeerings")}
    assert not {d["kind"] for d in docs} & {"KopfPeering", "ClusterKopfPeering"}


def documented_grants() -> dict[tuple[str, str], set[str]]:
    """(API group, resource) → verbs, from docs/helm.md's table of what the operator holds."""
    text = (ROOT / "docs" / "helm.md").read_text()
    table = text.split("<!-- operator-verbs: begin")[1].split("<!-- operator-verbs: end")[0]
    grants: dict[tuple[str, str], set[str]] = {}
    for row in table.splitlines():
        found = re.match(r"\| `([^`]+)`(?: \(([^)]+)\))? \| ([a-z, ]+) \|", row)
        if found:
            grants.setdefault((found[2] or "", found[1]), set()).update(v.strip() for v in found[3].split(","))
    return grants


def granted(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(API group, resource) → verbs over every Role and ClusterRole the chart renders."""
    grants: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        for rule in doc.get("rules") or () if doc["kind"] in ("Role", "ClusterRole") else ():
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize(("values", "cluster_wide"), [({}, True), ({"operator": {"watchNamespaces": ["team-*"]}}, True),
                                                      (NON_DEFAULT, False), (SECURITY, False)],
                         ids=["all namespaces", "glob", "named namespaces", "security"])
def test_the_operator_holds_exactly_the_documented_verbs_and_no_config_maps(values: dict[str, Any],
                                                                           cluster_wide: bool) -> None:
    grants = granted(render(values))
    assert not {("", "configmaps"), ("", "secrets"), ("", "pods/exec"), ("", "serviceaccounts/token")} & set(grants)
    expected = documented_grants()
    assert expected[("", "pods")] == {"get", "list", "watch"} and ("", "configmaps") not in expected
    if not cluster_wide:
        del expected[("", "namespaces")]  # kopf follows namespaces only to match patterns
    assert grants == expected


def test_leader_election_rbac_is_namespaced_and_limited_to_the_release_lease() -> None:
    for values in ({}, NON_DEFAULT):
        docs = render(values)
        role = one(docs, "Role", "kt-kubetune-leader-election")
        assert role["metadata"]["namespace"] == NS  # the release namespace only, whatever is watched
        grants = {(verb, tuple(rule.get("resourceNames") or ())) for rule in role["rules"]
                  for verb in rule["verbs"]}
        assert grants == {("create", ()), ("get", ("kt-kubetune",)), ("update", ("kt-kubetune",))}
        assert all(rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
                   for rule in role["rules"])
        binding = one(docs, "RoleBinding", "kt-kubetune-leader-election")
        assert binding["metadata"]["namespace"] == NS
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "kt-kubetune-leader-election"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": NS}]


def test_default_optional_parts_off() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "Secret", "PersistentVolumeClaim"}
    assert one(render(), "Service")["spec"]["ports"][0] == {"name": "metrics", "port": 8080,
                                                            "targetPort": "metrics", "protocol": "TCP"}


def test_helm_test_hook_checks_healthz() -> None:
    (pod,) = [d for d in render() if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "kubetune/operator:0.1.0" and c["command"] == ["python3", "-c"]
    assert "/healthz" in c["args"][0] and "/readyz" in c["args"][0] and 'b"leader"' in c["args"][0]
    assert env_of(c)["SERVICE_HOST_VAR"] == "KT_KUBETUNE_METRICS_SERVICE_HOST"


def test_dashboards_are_configmaps_with_sidecar_label() -> None:
    cms = [d for d in render() if d["kind"] == "ConfigMap"]
    assert {c["metadata"]["name"] for c in cms} == {f"kt-kubetune-dashboard-{n}" for n in ("gpu", "operator", "runs")}
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert key.startswith("kubetune-") and json.loads(text)["uid"].startswith("kubetune-")


def test_notes_tell_next_steps() -> None:
    text = notes()
    assert "helm test kt" in text and "kubectl get ftr" in text
    assert "kubectl delete crd finetuneruns.kubetune.io" in text
    assert f"kubectl -n {NS} delete lease kt-kubetune" in text and "kopf" not in text


# ------------------------------------------------------------------------------------------ non-default
def test_non_default_render() -> None:
    docs = render(NON_DEFAULT)
    dep = one(docs, "Deployment", "kt-kubetune")
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example/kubetune-operator:1.2.3" and c["imagePullPolicy"] == "Always"
    assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"]
    assert "--all-namespaces" not in c["args"] and "--verbose" in c["args"] and "--log-format=json" in c["args"]
    env = env_of(c)
    assert json.loads(env["KUBETUNE_GPU_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(env["KUBETUNE_GPU_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    # namespaced RBAC: a Role + binding per watched namespace, no cluster-wide operator rules; the Lease's Role
    # in the release namespace
    roles = find(docs, "Role")
    assert {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles} == {
        ("team-a", "kt-kubetune"), ("team-b", "kt-kubetune"), (NS, "kt-kubetune-leader-election")}
    assert {r["metadata"]["name"] for r in find(docs, "ClusterRole")} == {f"{NS}-kt-kubetune-crd-scan"}
    secrets = [d for d in find(docs, "Secret") if d["metadata"]["name"] == "s3creds"]
    assert {s["metadata"]["namespace"] for s in secrets} == {"team-a", "team-b"}
    assert secrets[0]["stringData"] == {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom" and sm["spec"]["endpoints"][0]["honorLabels"] is True
    alerts = alert_rules(docs)
    assert set(alerts) == {"KubetuneOperatorDown", "KubetuneReconcileErrors", "KubetuneStatusLagHigh",
                           "KubetuneRunPendingTooLong", "KubetuneRunStalled", "KubetuneRunsFailing"}
    assert all(r["labels"]["team"] == "ml" for r in alerts.values())
    assert {c["metadata"]["namespace"] for c in find(docs, "ConfigMap")} == {"monitoring"}
    assert one(docs, "Deployment", "kt-kubetune-minio")["spec"]["strategy"] == {"type": "Recreate"}
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://s3.example:9000"  # explicit endpoint wins over MinIO


def test_platform_policy_and_trainer_disk_values_reach_the_operator_settings() -> None:
    from kubetune.lifecycle.policy import PlatformPolicy
    from kubetune.operator.settings import OperatorSettings

    container = one(render(SECURITY), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in env_of(container).items() if isinstance(v, str)}
    settings = OperatorSettings.from_env(env)
    assert settings.ephemeral_storage == "50Gi"
    assert settings.platform_policy() == PlatformPolicy(
        images=("registry.example.com/ml/*", "ghcr.io/team/trainer:*", "registry.example.com/ml/trainer:2"),
        priority_classes=("batch-low", "batch-high"), toleration_keys=("spot", "nvidia.com/gpu"), max_gpus=4)
    default_env = env_of(one(render(), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]["containers"][0])
    assert not {k for k in default_env if "ALLOWED" in k or "MAX_GPUS" in k}  # unset: anything is allowed
    zero = env_of(one(render({"platformPolicy": {"maxGpusPerRun": 0}}), "Deployment", "kt-kubetune")["spec"][
        "template"]["spec"]["containers"][0])
    assert zero["KUBETUNE_MAX_GPUS_PER_RUN"] == "0"  # CPU-only platforms: 0 is a limit, not "unset"


def _network_policy_roundtrip(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` through the Kubernetes API's own model of a NetworkPolicy: a field it does not know is dropped."""
    from kubernetes import client

    api = client.ApiClient()
    model = api.deserialize(json.dumps(doc), "V1NetworkPolicy", "application/json")
    return dict(api.sanitize_for_serialization(model))


def test_trainer_network_policy_is_off_by_default() -> None:
    assert not find(render(), "NetworkPolicy")


def test_trainer_network_policy_lets_trainers_reach_only_each_other_dns_and_the_object_store() -> None:
    from kubetune.operator import manifests

    policies = find(render(SECURITY), "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {"team-a", "team-b"}  # the watched namespaces
    policy = policies[0]
    assert _network_policy_roundtrip(policy) == policy  # every field is one Kubernetes knows
    spec = policy["spec"]
    # it selects the operator's trainer pods, by the labels the operator puts on them
    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "team-a", "uid": "u"}}
    pod_labels = manifests.labels(run, 1)
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    trainers = [{"podSelector": {"matchLabels": spec["podSelector"]["matchLabels"]}}]
    assert spec["ingress"] == [{"from": trainers}]  # the pods of a run over several pods, nothing else
    peers, dns, store, extra = spec["egress"]
    assert peers == {"to": trainers}
    assert dns["to"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    assert store == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"ipBlock": {"cidr": "192.168.7.10/32"}}],
                     "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 9000}]}
    assert extra == SECURITY["networkPolicy"]["extraEgress"][0]
    listed = find(render({**SECURITY, "operator": {}, "networkPolicy": {**SECURITY["networkPolicy"],
                                                                         "namespaces": ["ml"]}}), "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in listed] == ["ml"]  # cluster-wide mode with a list


def test_trainer_network_policy_needs_namespaces_and_the_object_store() -> None:
    with pytest.raises(helm.HelmError, match=r"networkPolicy\.enabled needs networkPolicy\.namespaces"):
        render({"networkPolicy": {"enabled": True, "objectStore": {"cidrs": ["10.0.0.0/8"]}}})
    with pytest.raises(helm.HelmError, match=r"needs networkPolicy\.objectStore\.cidrs"):
        render({"operator": {"watchNamespaces": ["a"]}, "networkPolicy": {"enabled": True}})


def test_minio_endpoint_default() -> None:
    docs = render({"minio": {"enabled": True}})
    env = env_of(one(docs, "Deployment", "kt-kubetune")["spec"]["template"]["spec"]["containers"][0])
    assert env["KUBETUNE_S3_ENDPOINT"] == f"http://kt-kubetune-minio.{NS}.svc:9000"
    assert one(docs, "Service", "kt-kubetune-minio")["spec"]["ports"][0]["port"] == 9000


def test_glob_namespaces_need_cluster_wide_rbac() -> None:
    docs = render({"operator": {"watchNamespaces": ["team-*"]}})
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-*" in args and "--all-namespaces" not in args
    assert [r["metadata"]["name"] for r in find(docs, "Role")] == ["kt-kubetune-leader-election"]  # no operator Role
    rules = one(docs, "ClusterRole", f"{NS}-kt-kubetune")["rules"]
    assert any(r["resources"] == ["namespaces"] for r in rules)


def test_leader_election_off_runs_standalone() -> None:
    docs = render({"leaderElection": {"enabled": False}})
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and not any(a.startswith("--leader-election") for a in args)
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    assert "delete lease" not in notes({"leaderElection": {"enabled": False}})


def test_chart_args_parse_with_the_operator() -> None:
    """The Deployment's args are flags the operator knows, and elect on the release's Lease in the pod's
    namespace (POD_NAMESPACE, set by the chart)."""
    from kubetune.operator.__main__ import election_config, parse_args

    for values in ({}, NON_DEFAULT):
        args = one(render(values), "Deployment", "kt-kubetune")["spec"]["template"]["spec"]["containers"][0]["args"]
        election = election_config(parse_args(args))
        assert election is not None and election.name == "kt-kubetune"
    args = one(render({"leaderElection": {"enabled": False}}), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert election_config(parse_args(args)) is None


def test_render_failures_explain_themselves() -> None:
    with pytest.raises(helm.HelmError, match=r"createSecret needs operator\.watchNamespaces"):
        render({"runDefaults": {"s3": {"createSecret": True, "accessKey": "a", "secretKey": "b"}}})
    with pytest.raises(helm.HelmError, match=r"needs runDefaults\.s3\.accessKey"):
        render({"operator": {"watchNamespaces": ["x"]}, "runDefaults": {"s3": {"createSecret": True}}})
    with pytest.raises(helm.HelmError, match=r"replicas > 1 needs leaderElection\.enabled"):
        render({"operator": {"replicas": 2}, "leaderElection": {"enabled": False}})


# ------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize(("values", "expected"), [
    ({"operator": {"replicas": "two"}}, r"replicas.*(integer|type)"),
    ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, r"pullPolicy"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, r"enabled.*(boolean|type)"),
    ({"operator": {"watchNamespaces": "team-a"}}, r"watchNamespaces.*(array|type)"),
    ({"operator": {"watchNamespaces": ["Team_A"]}}, r"watchNamespaces"),
    ({"runDefaults": {"s3": {"endpoint": "s3.example.com"}}}, r"endpoint"),
    ({"runDefaults": {"statusQPS": 0}}, r"statusQPS"),
    ({"runDefaults": {"models": {"mirror": "http://minio:9000/models"}}}, r"mirror"),
    ({"operater": {}}, r"operater"),
    ({"operator": {"metricsPort": 70000}}, r"metricsPort"),
    ({"runDefaults": {"gpu": {"tolerations": [{"effect": "Sometimes"}]}}}, r"effect"),
    ({"leaderElection": {"enabled": "yes"}}, r"enabled.*(boolean|type)"),
    ({"peering": {"enabled": True}}, r"peering"),  # the kopf peering values are gone
    ({"metrics": {"scrapeAnnotations": "yes"}}, r"scrapeAnnotations"),
    ({"metrics": {"prometheusRule": {"failedRuns": {"ratio": 1.5}}}}, r"ratio"),
    ({"metrics": {"prometheusRule": {"pendingFor": "30m"}}}, r"pendingFor"),  # now pendingSeconds
    ({"metrics": {"prometheusRule": {"selector": "{job=\"x\"}"}}}, r"selector"),  # matchers, not a selector
    ({"platformPolicy": {"allowedImages": ["registry.example.com*"]}}, r"allowedImages"),
    ({"platformPolicy": {"allowedImages": "registry.example.com/ml/*"}}, r"allowedImages.*(array|type)"),
    ({"platformPolicy": {"maxGpusPerRun": -1}}, r"maxGpusPerRun"),
    ({"platformPolicy": {"allowedPriorityClasses": ["High"]}}, r"allowedPriorityClasses"),
    ({"platformPolicy": {"allowedRegistries": []}}, r"allowedRegistries"),
    ({"networkPolicy": {"objectStore": {"cidrs": ["minio.example.com"]}}}, r"cidrs"),
    ({"networkPolicy": {"objectStore": {"ports": [70000]}}}, r"ports"),
    ({"runDefaults": {"trainer": {"ephemeralStorage": "lots"}}}, r"ephemeralStorage"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], expected: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError) as err:
        chart.render(values, name=RELEASE, namespace=NS)
    assert re.search(expected, str(err.value), re.IGNORECASE), str(err.value)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(values))


def test_schema_accepts_defaults_and_non_default() -> None:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(chart.merge_values({}))
    chart.validate_schema(chart.merge_values(NON_DEFAULT))


# ------------------------------------------------------------------------------------------ alerts and scraping
RULES_AND_MONITOR = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
CHART_POD_LABELS = {"app_kubernetes_io_name": "kubetune", "app_kubernetes_io_instance": RELEASE,
                    "app_kubernetes_io_component": "operator"}


def alert_rules(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = one(docs, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def selectors(expr: str) -> list[dict[str, str]]:
    """The equality matchers of every series selector (``{...}``) in a PromQL expression."""
    return [dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', body)) for body in re.findall(r"\{([^}]*)\}", expr)]


def prometheus_label(pod_label: str) -> str:
    """How Kubernetes service discovery (and so a ServiceMonitor's podTargetLabels, or a scrape job's labelmap of
    __meta_kubernetes_pod_label_(.+)) names a pod label on the series."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


def test_alerts_select_the_release_by_labels_both_scrapes_put_on_the_series() -> None:
    """Not `job` (the scrape job's name is not the chart's to choose): the operator pod's labels, which the
    ServiceMonitor copies onto the series and a pod-annotation scrape job maps the same way."""
    docs = render(RULES_AND_MONITOR)
    pod_labels = one(docs, "Deployment", "kt-kubetune")["spec"]["template"]["metadata"]["labels"]
    copied = one(docs, "ServiceMonitor")["spec"]["podTargetLabels"]
    assert {prometheus_label(name): pod_labels[name] for name in copied} == CHART_POD_LABELS
    for name, rule in alert_rules(docs).items():
        assert "job" not in rule["expr"], name
        assert selectors(rule["expr"]), name
        for matchers in selectors(rule["expr"]):
            assert CHART_POD_LABELS.items() <= matchers.items(), (name, matchers)


def test_alert_selector_and_thresholds_come_from_values() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "selector": 'job="kubetune"', "pendingSeconds": 600,
                                             "stalledSeconds": 900, "failedRuns": {"window": "3h", "ratio": 0.25,
                                                                                   "min": 5}}}}
    alerts = alert_rules(render(values))
    for rule in alerts.values():
        assert all(m.get("job") == "kubetune" and "app_kubernetes_io_instance" not in m
                   for m in selectors(rule["expr"])), rule["expr"]
    assert alerts["KubetuneRunPendingTooLong"]["expr"].endswith("> 600")
    assert alerts["KubetuneRunStalled"]["expr"].endswith("> 900")
    failing = alerts["KubetuneRunsFailing"]["expr"]
    assert "[3h]" in failing and "> 0.25" in failing and failing.endswith(">= 5") and "[1h]" not in failing


def test_per_run_alerts_name_the_run_and_release_wide_ones_do_not() -> None:
    alerts = alert_rules(render(RULES_AND_MONITOR))
    for name in ("KubetuneRunPendingTooLong", "KubetuneRunStalled"):
        assert "max by (namespace, name)" in alerts[name]["expr"]
        assert "{{ $labels.namespace }}/{{ $labels.name }}" in alerts[name]["annotations"]["summary"]
    assert "sum by (handler)" in alerts["KubetuneReconcileErrors"]["expr"]
    assert alerts["KubetuneOperatorDown"]["labels"]["severity"] == "critical"


def test_alert_metrics_are_exported_by_the_operator() -> None:
    exported = _operator_exported()
    for name, rule in alert_rules(render(RULES_AND_MONITOR)).items():
        unknown = metric_names(rule["expr"]) - exported - EXTERNAL_METRICS
        assert not unknown, f"{name}: {sorted(unknown)} not exported by the operator"


@pytest.mark.parametrize(("metrics", "annotated"), [
    ({}, True),
    ({"serviceMonitor": {"enabled": True}}, False),  # else a Prometheus doing both would scrape twice
    ({"serviceMonitor": {"enabled": True}, "scrapeAnnotations": True}, True),
    ({"scrapeAnnotations": False}, False),
], ids=["default", "service-monitor", "forced", "off"])
def test_scrape_annotations_when_no_service_monitor_unless_set(metrics: dict[str, Any], annotated: bool) -> None:
    values = {"metrics": metrics, "operator": {"podAnnotations": {"team": "ml"}}}
    template = one(render(values), "Deployment", "kt-kubetune")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["team"] == "ml"
    scrape = {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}
    assert scrape == ({"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
                      if annotated else {})
    bare = one(render({"metrics": {"scrapeAnnotations": False}}), "Deployment", "kt-kubetune")["spec"]["template"]
    assert "annotations" not in bare["metadata"]


# ------------------------------------------------------------------------------------------ CRDs
def _crds(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return sorted((d for d in docs if d["kind"] == "CustomResourceDefinition"), key=lambda d: d["metadata"]["name"])


@pytest.mark.parametrize("path", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_chart_crds_match_generated(path: Path) -> None:
    """The chart's crds/ carry the same CustomResourceDefinitions as the repository's crds/."""
    copy = CHART / "crds" / path.name
    assert copy.exists(), f"{copy} is missing: copy the CRDs of {path}"
    assert _crds(copy) == _crds(path), f"{copy} drifted from {path}: copy its CustomResourceDefinitions again"
    if path.name == "finetunerun.yaml":
        assert copy.read_text() == path.read_text(), f"cp {path} {copy}"


def test_chart_ships_only_the_finetunerun_crd() -> None:
    names = {doc["metadata"]["name"] for crd in helm.Chart.load(CHART).crds
             for doc in yaml.safe_load_all(crd["data"]) if doc}
    assert names == {"finetuneruns.kubetune.io"}  # leader election needs no CRD of its own (a Lease)


# ------------------------------------------------------------------------------------------ dashboards
def dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def panel_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after removing strings, label matchers, ranges,
    grouping clauses and function calls' names."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    found = {m.group(1) for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", s)}
    return found - PROMQL_WORDS


def test_dashboards_structure() -> None:
    dashes = dashboards()
    assert set(dashes) == {"operator", "runs", "gpu"}
    for name, dash in dashes.items():
        assert dash["uid"] == f"kubetune-{name}"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        variables = {v["name"] for v in dash["templating"]["list"]}
        assert "datasource" in variables
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", (name, p["title"])
            assert p["targets"], (name, p["title"])
            for t in p["targets"]:
                for var in re.findall(r"\$(\w+)", t["expr"]):
                    assert var in variables or var.startswith("__") or var == "1", (name, p["title"], var)
    runs_vars = {v["name"] for v in dashes["runs"]["templating"]["list"]}
    assert {"namespace", "run"} <= runs_vars


def test_dashboards_cover_the_issue() -> None:
    """The panels the issue asks for exist (by the metric families they query)."""
    used = {name: set().union(*(metric_names(e) for _, e in panel_exprs(d))) for name, d in dashboards().items()}
    assert {"kubetune_runs", "kubetune_run_transitions_total", "kubetune_reconcile_duration_seconds_bucket",
            "kubetune_status_lag_seconds_bucket", "kubetune_reconcile_errors_total", "process_cpu_seconds_total",
            "process_resident_memory_bytes"} <= used["operator"]
    assert {"kubetune_run_progress_ratio", "kubetune_run_eta_seconds", "kubetune_run_train_loss",
            "kubetune_run_val_loss", "kubetune_run_evaluation", "kubetune_run_samples_per_second",
            "kubetune_run_info"} <= used["runs"]
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "kubetune_run_pod_info"} <= used["gpu"]


def _operator_exported() -> set[str]:
    from kubetune.operator.metrics import Metrics
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.table.update("ns", "run", {"phase": "Running", "podName": "run-a1-x7k2p",
                                 "progress": {"percent": 10.0, "samplesPerSecond": 1.0, "etaSeconds": 5.0},
                                 "metrics": {"trainLoss": 1.0, "valLoss": 1.1,
                                             "before": {"recall_at_k": 0.2}, "after": {"recall_at_k": 0.3}}})
    m.transition(None, "Running")
    with m.timed("accept"):
        pass
    m.observe_lag([0.0], 0.5)
    m.jobs_created.labels(reason="new").inc()
    m.trainer_events.labels(type="progress").inc()
    m.status_patches.inc()
    m.info.labels(version="0.1.0", kubernetes="v1.20.2").set(1)
    names: set[str] = set()
    for family in text_string_to_metric_families(m.exposition().decode()):
        names |= {s.name for s in family.samples}
    return names


def test_dashboard_metrics_are_known() -> None:
    """Every metric a panel queries is exported by the operator or by a named exporter (DCGM, kube-state-metrics,
    Prometheus itself)."""
    exported = _operator_exported()
    for name, dash in dashboards().items():
        for title, expr in panel_exprs(dash):
            for metric in metric_names(expr):
                ok = metric in exported or metric in EXTERNAL_METRICS or DCGM.match(metric)
                assert ok, f"{name} / {title}: unknown metric {metric} in {expr}"


def test_requested_operator_metrics_exported() -> None:
    missing = sorted(set(REQUESTED_FROM_OPERATOR) - _operator_exported())
    assert not missing, "operator does not export: " + ", ".join(missing)
