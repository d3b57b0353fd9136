"""The Helm chart on the real harness cluster, scraped by the real Prometheus.

One module-scoped release (operator image built from operator.Dockerfile, stand-in trainer image) watching its
own runs namespace; the tests run in file order against it:

1. install (Helm library, waits for the operator to be Ready) and ``helm test`` (the hook pod checks /healthz,
   /readyz); without ``operator.hostAliases``: the harness has no cluster DNS, and the operator's in-cluster login
   addresses the API server by ``KUBERNETES_SERVICE_HOST``/``_PORT``;
2. a FinetuneRun runs to Succeeded and another to Failed, run by the in-cluster operator, and a third asks for a GPU
   (none here), so it stays Pending with the chart's ``runDefaults.gpu`` node selector and toleration on its Job;
   Prometheus scrapes the operator through its pod IP meanwhile; ``promtool check metrics`` is clean on its
   exposition;
3. ``promtool check rules`` passes on the rendered PrometheusRule, and Prometheus evaluates every alert expression;
4. every PromQL expression of every dashboard panel (and every variable query) parses and returns at least one
   series from that Prometheus (the operator's own panels included: run info, ETA, validation loss, evaluation,
   handler errors, process CPU/memory). GPU panels are evaluated against ``tests/fixtures/dcgm.prom``, a FIXTURE
   DCGM exporter + kube-state-metrics exposition (no GPU here) naming the real run's pod, served by a local HTTP
   server and scraped by the same Prometheus;
5. uninstall leaves nothing but the CRDs.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.prometheus import Prometheus
from tests.integration.test_operator_support import Runs, run_manifest, standin, standin_image, wait_for
from tests.unit.test_helm_chart import REQUESTED_FROM_OPERATOR, dashboards, prometheus_label

__all__ = ["standin_image"]

helm = pytest.importorskip("helm_python")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
OPERATOR_IMAGE = "kubetune/operator:dev"
DCGM_FIXTURE = ROOT / "tests" / "fixtures" / "dcgm.prom"
PROMTOOL = "promtool"
GPU_NODE_SELECTOR = {"kubetune.io/e2e-gpu-pool": "none"}  # no node has it: the GPU run stays Pending
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
RUN_NAMES = ("ok", "bad", "gpu-waiting")


@dataclass
class Release:
    name: str
    namespace: str  # the operator's
    runs_namespace: str  # the watched one
    fullname: str
    config: Any
    kube_api: Any
    kubeconfig: str
    values: dict[str, Any]
    pod_ip: str = ""
    job: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    scraped: set[str] = field(default_factory=set)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.pod_ip}:8080/metrics"


@pytest.fixture(scope="module")
def operator_image(e2e_cluster: Any) -> str:
    from tests.cluster.images import ensure_project_image
    from tests.cluster.procs import machine_lock

    with machine_lock("image-operator"):
        return ensure_project_image(OPERATOR_IMAGE, "operator.Dockerfile", ("operator/kubetune",), ("operator",))


def _core(api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api)


def _operator_pods(rel: Release) -> list[Any]:
    selector = f"app.kubernetes.io/instance={rel.name},app.kubernetes.io/component=operator"
    return list(_core(rel.kube_api).list_namespaced_pod(rel.namespace, label_selector=selector).items)


def _operator_log(rel: Release) -> str:
    out = []
    for pod in _operator_pods(rel):
        try:
            out.append(_core(rel.kube_api).read_namespaced_pod_log(pod.metadata.name, rel.namespace, tail_lines=80))
        except Exception as err:  # the pod may be gone
            out.append(f"(no log for {pod.metadata.name}: {err})")
    return "\n".join(out)


@pytest.fixture(scope="module")
def release(e2e_cluster: Any, kube_api: Any, operator_image: str, standin_image: str, s3_server: Any,
            s3_client: Any, prometheus: Prometheus) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    name = f"kth-{suffix}"
    ns, runs_ns = f"t-helm-{suffix}", f"t-helm-{suffix}-runs"
    core = _core(kube_api)
    for n in (ns, runs_ns):
        core.create_namespace({"metadata": {"name": n, "labels": {"kubetune.io/test": "true"}}})
    bucket = f"kt-helm-{suffix}"
    s3_client.make_bucket(bucket)
    repo, tag = operator_image.split(":")
    trainer_repo_tag = standin_image
    # No cluster DNS in the harness, and no operator.hostAliases either: the operator's in-cluster login finds the
    # API server through KUBERNETES_SERVICE_HOST/_PORT.
    values = {
        "operator": {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
                     "watchNamespaces": [runs_ns], "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}},
        "runDefaults": {"trainer": {"image": trainer_repo_tag, "pullPolicy": "Never"},
                        "s3": {"endpoint": s3_server.pod_endpoint, "bucket": bucket, "createSecret": True,
                               "accessKey": s3_server.access_key, "secretKey": s3_server.secret_key},
                        "gpu": {"nodeSelector": GPU_NODE_SELECTOR, "tolerations": GPU_TOLERATIONS},
                        "statusInterval": 0.5},
    }
    config = helm.Config(kubeconfig_path=e2e_cluster.kubeconfig, namespace=ns)
    rel = Release(name=name, namespace=ns, runs_namespace=runs_ns, fullname=f"{name}-kubetune", config=config,
                  kube_api=kube_api, kubeconfig=e2e_cluster.kubeconfig, values=values)
    rel.job = f"{rel.fullname}-metrics"
    try:
        yield rel
    finally:
        for target in prometheus.targets_dir.glob(f"*{name}*.json"):
            target.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            config.uninstall(name, ignore_not_found=True, timeout=60)
        for n in (runs_ns, ns):
            with contextlib.suppress(Exception):
                core.delete_namespace(n, propagation_policy="Background")


def _runs(rel: Release) -> Runs:
    return Runs(rel.kube_api, rel.runs_namespace)


# ------------------------------------------------------------------------------------------ 1. install
def test_install_and_helm_test(release: Release, prometheus: Prometheus) -> None:
    rel = release
    t0 = time.monotonic()
    try:
        installed = rel.config.install(str(CHART), rel.name, rel.values, namespace=rel.namespace, wait="watcher",
                                       timeout=180)
    except helm.HelmError as err:
        pytest.fail(f"helm install failed: {err}\noperator log:\n{_operator_log(rel)}")
    rel.timings["install_s"] = time.monotonic() - t0
    assert '"deployed"' in json.dumps(installed) or '"deployed"' in json.dumps(rel.config.status(rel.name)), installed
    (pod,) = _operator_pods(rel)
    assert pod.status.phase == "Running" and all(c.ready for c in pod.status.container_statuses)
    assert not pod.spec.host_aliases, "the operator must log in without a kubernetes.default.svc host alias"
    rel.pod_ip = pod.status.pod_ip
    container = pod.spec.containers[0]
    assert container.security_context.read_only_root_filesystem is True
    assert pod.spec.security_context.run_as_non_root is True
    # Prometheus scrapes the operator through its pod IP (the docker bridge is reachable from the host), with the
    # pod's labels on the series as the chart's ServiceMonitor (podTargetLabels) puts them: the alerts select on them.
    prometheus.add_target(rel.job, f"{rel.pod_ip}:8080", {
        prometheus_label(k): v for k, v in pod.metadata.labels.items() if k.startswith("app.kubernetes.io/")})
    t0 = time.monotonic()
    result = rel.config.test(rel.name, timeout=120, logs=True)
    rel.timings["helm_test_s"] = time.monotonic() - t0
    logs = json.dumps(result.get("logs", ""))
    assert "ok http://" in logs and "/healthz" in logs, result


# ------------------------------------------------------------------------------------------ 2. runs + scrape
def test_runs_reach_their_phases_scraped_by_prometheus(release: Release, prometheus: Prometheus) -> None:
    rel = release
    if not rel.pod_ip:
        pytest.skip("install failed")
    runs = _runs(rel)
    t0 = time.monotonic()
    runs.create(run_manifest("ok", model=standin(steps=32, pace=0.5), training={"epochs": 2}))
    runs.create(run_manifest("bad", model=standin(steps=4, pace=0.3, exit_code=1), runPolicy={"backoffLimit": 0}))
    runs.create(run_manifest("gpu-waiting", model=standin(), resources={"gpus": 1, "cpu": "50m", "memory": "64Mi"}))
    # While it runs, Prometheus sees its progress from the in-cluster operator.
    series = prometheus.wait_for_series(
        f'kubetune_run_progress_ratio{{job="{rel.job}", namespace="{rel.runs_namespace}", name="ok"}} > 0', 90)
    assert series, f"Prometheus never saw progress; operator log:\n{_operator_log(rel)}"
    # Some series exist only while a run is Running (its last-progress time): read them now.
    while_running = _exported_names(rel)
    try:
        final = runs.wait_phase("ok", "Succeeded", 120)
        runs.wait_phase("bad", "Failed", 60)
    except BaseException:
        print(_operator_log(rel))
        raise
    rel.timings["run_to_succeeded_s"] = time.monotonic() - t0
    assert final["progress"]["percent"] == 100 and final["artifact"]["uri"]
    done = prometheus.wait_for_series(
        f'kubetune_run_progress_ratio{{job="{rel.job}", namespace="{rel.runs_namespace}", name="ok"}} == 1', 30)
    assert done
    assert prometheus.wait_for_series(f'kubetune_runs{{job="{rel.job}", phase="Succeeded"}} == 1', 30)
    assert prometheus.wait_for_series(f'kubetune_runs{{job="{rel.job}", phase="Failed"}} == 1', 30)
    # The GPU run's Job carries the chart's GPU placement defaults (applied by the operator); it stays Pending.
    job = wait_for(lambda: _job_or_none(runs, "gpu-waiting-a1"), 60, "the GPU run's Job")
    pod_spec = job.spec.template.spec
    assert pod_spec.node_selector == GPU_NODE_SELECTOR
    assert [{"key": t.key, "operator": t.operator, "effect": t.effect} for t in pod_spec.tolerations or []] == \
        GPU_TOLERATIONS
    assert runs.status("gpu-waiting").get("phase") == "Pending"
    # promtool's lint is clean on the operator's own exposition.
    with urllib.request.urlopen(rel.metrics_url, timeout=10) as resp:
        exposition = resp.read()
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout.decode() + check.stderr.decode())
    rel.scraped = _metric_names(exposition) | while_running
    missing = set(REQUESTED_FROM_OPERATOR) - rel.scraped
    assert not missing, f"the in-cluster operator does not export {sorted(missing)}"


def _metric_names(exposition: bytes) -> set[str]:
    return {m.decode() for m in re.findall(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?=[{ ])", exposition, re.M)}


def _exported_names(rel: Release) -> set[str]:
    with urllib.request.urlopen(rel.metrics_url, timeout=10) as resp:
        return _metric_names(resp.read())


def _job_or_none(runs: Runs, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return runs.batch.read_namespaced_job(name, runs.namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


# ------------------------------------------------------------------------------------------ 3. rules
def test_prometheus_rule_passes_promtool_and_evaluates(release: Release, prometheus: Prometheus,
                                                       tmp_path: Path) -> None:
    rel = release
    chart = helm.Chart.load(CHART)
    values = {**rel.values, "metrics": {"prometheusRule": {"enabled": True}}}
    rendered = chart.render(values, name=rel.name, namespace=rel.namespace)
    (rule,) = [d for d in yaml.safe_load_all(rendered["kubetune/templates/prometheusrule.yaml"]) if d]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6 rules found" in check.stdout, check.stdout
    if not rel.pod_ip:
        return
    exprs = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    for expr in exprs.values():
        prometheus.query(expr)  # raises when Prometheus rejects it
    # The operator is up and scraped: the "down" alert's condition is empty.
    assert prometheus.query(exprs["KubetuneOperatorDown"]) == []
    # The GPU run waits: its Pending age is there (below the threshold, so the alert itself is quiet).
    pending_age = exprs["KubetuneRunPendingTooLong"].rsplit(" > ", 1)[0]
    assert {r["metric"]["name"] for r in prometheus.query(pending_age)} == {"gpu-waiting"}
    assert prometheus.query(exprs["KubetuneRunPendingTooLong"]) == []


# ------------------------------------------------------------------------------------------ 4. dashboards
class _FixtureHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def dcgm_fixture_target(release: Release, prometheus: Prometheus) -> Iterator[str]:
    rel = release
    runs = _runs(rel)
    status = runs.status("ok")
    pod = status.get("podName") or ""
    assert pod, status
    run = runs.get("ok") or {}
    body = (DCGM_FIXTURE.read_text().replace("__NAMESPACE__", rel.runs_namespace).replace("__POD__", pod)
            .replace("__RUN__", "ok").replace("__UID__", run["metadata"]["uid"]))
    handler = type("Handler", (_FixtureHandler,), {"body": body.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    job = f"dcgm-fixture-{rel.name}"
    target = prometheus.add_target(job, f"127.0.0.1:{server.server_address[1]}")
    try:
        assert prometheus.wait_for_series(f'DCGM_FI_DEV_GPU_UTIL{{job="{job}"}}', 30)
        yield job
    finally:
        target.unlink(missing_ok=True)
        server.shutdown()


def _substitute(expr: str, rel: Release) -> str:
    subs = {"$job": rel.job, "$namespace": rel.runs_namespace, "$run": "|".join(RUN_NAMES), "$__rate_interval": "1m",
            "${datasource}": ""}
    for key in sorted(subs, key=len, reverse=True):
        expr = expr.replace(key, subs[key])
    assert "$" not in expr.replace("$1", ""), f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_returns_series(release: Release, prometheus: Prometheus,
                                              dcgm_fixture_target: str) -> None:
    rel = release
    if not rel.pod_ip:
        pytest.skip("install failed")
    empty: list[tuple[str, str]] = []
    checked = 0
    for dash_name, dash in dashboards().items():
        queries: list[tuple[str, str]] = []
        for panel in dash["panels"]:
            if panel["type"] != "row":
                queries += [(panel["title"], t["expr"]) for t in panel["targets"]]
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
                assert m, var["definition"]
                queries.append((f"variable ${var['name']}", m.group(1)))
        for title, expr in queries:
            promql = _substitute(expr, rel)
            result = prometheus.query(promql)  # raises with Prometheus's message when it does not parse
            checked += 1
            if not result:
                empty.append((f"{dash_name} / {title}", promql))
    assert checked >= 40
    # On this loaded 2-core machine a scrape of the operator sometimes times out (2 s interval and timeout); a
    # failed scrape marks all of the target's series stale, so instant queries return nothing until the next
    # good scrape. Judge a panel empty only if it stays empty over several scrapes.
    retried = len(empty)
    deadline = time.monotonic() + 60
    while empty and time.monotonic() < deadline:
        time.sleep(2)
        empty = [(title, promql) for title, promql in empty if not prometheus.query(promql)]
    assert not empty, "panels without series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)
    print(f"\n{checked} dashboard queries return series ({retried} only after a retry)")


# ------------------------------------------------------------------------------------------ 5. uninstall
def test_uninstall_leaves_only_crds(release: Release) -> None:
    from kubernetes import client

    rel = release
    api = rel.kube_api
    runs = _runs(rel)
    # Runs first, while the operator can still remove its finalizer from them.
    for run in RUN_NAMES:
        if runs.get(run):
            runs.delete(run)
    wait_for(lambda: not any(runs.get(run) for run in RUN_NAMES), 60, "the runs to be deleted")
    t0 = time.monotonic()
    rel.config.uninstall(rel.name, wait="watcher", timeout=120)
    rel.timings["uninstall_s"] = time.monotonic() - t0
    selector = f"app.kubernetes.io/instance={rel.name}"
    core, apps, rbac = client.CoreV1Api(api), client.AppsV1Api(api), client.RbacAuthorizationV1Api(api)

    def names(items: list[Any]) -> list[str]:
        return [str(o.metadata.name) for o in items]

    def leftovers() -> list[str]:
        found: list[str] = []
        for ns in (rel.namespace, rel.runs_namespace):
            for kind, lister in (("Deployment", apps.list_namespaced_deployment),
                                 ("Service", core.list_namespaced_service),
                                 ("ConfigMap", core.list_namespaced_config_map),
                                 ("Secret", core.list_namespaced_secret),
                                 ("ServiceAccount", core.list_namespaced_service_account),
                                 ("Pod", core.list_namespaced_pod),
                                 ("Role", rbac.list_namespaced_role),
                                 ("RoleBinding", rbac.list_namespaced_role_binding)):
                found += [f"{kind} {ns}/{n}" for n in names(lister(ns, label_selector=selector).items)]
            found += [f"helm release {n}" for n in names(core.list_namespaced_secret(
                ns, label_selector=f"owner=helm,name={rel.name}").items)]
        prefix = f"{rel.namespace}-{rel.fullname}"
        found += [f"ClusterRole {n}" for n in names(rbac.list_cluster_role().items) if n.startswith(prefix)]
        found += [f"ClusterRoleBinding {n}" for n in names(rbac.list_cluster_role_binding().items)
                  if n.startswith(prefix)]
        return found

    wait_for(lambda: not leftovers(), 90, f"nothing of the release to remain (left: {leftovers()})", interval=1)
    # Helm's convention: CRDs stay (documented removal: kubectl delete crd ...; see docs/helm.md).
    ext = client.ApiextensionsV1Api(api)
    crd: Any = ext.read_custom_resource_definition("finetuneruns.kubetune.io")
    assert crd.metadata.name == "finetuneruns.kubetune.io"
    print(f"\nhelm e2e timings: {json.dumps({k: round(v, 1) for k, v in rel.timings.items()})}")
