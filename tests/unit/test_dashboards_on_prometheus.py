"""The GPU dashboard's joins and the alert expressions, evaluated by the real Prometheus (the harness's, a local
process: no Kubernetes) through its query API, on series it scraped itself:

- the operator's real exposition (:class:`~kubetune.operator.metrics.Metrics`), with the target labels a
  ServiceMonitor gives it (the chart's pod labels). The harness's scrape job does not honor labels, so the target
  carries no ``namespace``/``pod`` of its own: the per-run series keep theirs, as under ``honorLabels: true``;
- ``tests/fixtures/dcgm.prom`` (a DCGM exporter's exposition, a FIXTURE: no GPU here) for two trainer pods of runs
  with 70-character names (pod names and the ``kubetune.io/run`` label are shortened, the run's name is not),
  scraped twice over: once with the target labels of dcgm-exporter's own ServiceMonitor (``honorLabels: false``:
  its ``namespace``/``pod`` labels conflict and arrive as ``exported_namespace``/``exported_pod``), once honoring
  the exporter's labels.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.names import job_name, run_label
from kubetune.lifecycle.conditions import transition
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.operator.metrics import Metrics

from tests.cluster.prometheus import Prometheus

helm = pytest.importorskip("helm_python")

# A real Prometheus process, like tests/unit/test_harness.py's scrape test; no Kubernetes API server.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
DCGM_FIXTURE = ROOT / "tests" / "fixtures" / "dcgm.prom"
GPU_UTIL, FB_USED, FB_FREE = 93.0, 59415.0, 21504.0  # the fixture's values for the trainer's GPU
SAMPLES_PER_SECOND = 186.0


class _Exposition(http.server.BaseHTTPRequestHandler):
    body: Callable[[], bytes] = staticmethod(lambda: b"")

    def do_GET(self) -> None:
        body = self.body()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def scraped(prometheus: Prometheus, job: str, body: Callable[[], bytes], labels: dict[str, str]) -> Iterator[None]:
    """Serve ``body`` on loopback and have Prometheus scrape it as ``job`` with ``labels`` as target labels."""
    handler = type("Handler", (_Exposition,), {"body": staticmethod(body)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = prometheus.add_target(job, f"127.0.0.1:{server.server_address[1]}", labels)
    try:
        yield
    finally:
        target.unlink(missing_ok=True)
        server.shutdown()


@dataclass(frozen=True)
class Run:
    namespace: str
    name: str

    @property
    def pod(self) -> str:
        return f"{job_name(self.name, 1)}-x7k2p"  # the Job controller's pod name for attempt 1


@dataclass(frozen=True)
class World:
    release: str
    honored: Run  # its GPUs scraped honoring DCGM's labels
    exported: Run  # its GPUs scraped as dcgm-exporter's ServiceMonitor does (exported_pod, exported_namespace)
    prometheus: Prometheus


def dcgm_text(run: Run) -> bytes:
    text = DCGM_FIXTURE.read_text()
    for key, value in (("__NAMESPACE__", run.namespace), ("__POD__", run.pod), ("__RUN__", run_label(run.name)),
                       ("__UID__", str(uuid.uuid4()))):
        text = text.replace(key, value)
    return text.encode()


@pytest.fixture(scope="module")
def world(prometheus: Prometheus) -> Iterator[World]:
    suffix = uuid.uuid4().hex[:6]
    release = f"kt-{suffix}"
    long_name = "clip-finetune-product-photos-to-catalogue-captions-{}-ablation-lr-3e-05"
    honored = Run(f"team-a-{suffix}", long_name.format("a"))
    exported = Run(f"team-b-{suffix}", long_name.format("b"))
    assert len(honored.name) == 70 and run_label(honored.name) != honored.name
    offset = [0.0]
    metrics = Metrics(lambda: time.time() + offset[0])
    now = time.time()
    for run in (honored, exported):
        metrics.table.update(run.namespace, run.name,
                             {**transition({}, "Running", "PodRunning", "", now - 60), "podName": run.pod,
                              "progress": {"step": 7, "samplesPerSecond": SAMPLES_PER_SECOND}})
    # For the alerts: a run Pending for an hour, one just created, and one whose step stopped an hour ago.
    metrics.table.update(honored.namespace, "waits", {"phase": "Pending"}, created=now_rfc3339(now - 3600))
    metrics.table.update(honored.namespace, "fresh", {"phase": "Pending"}, created=now_rfc3339(now))
    offset[0] = -3600.0
    metrics.table.update(honored.namespace, "stuck", {**transition({}, "Running", "PodRunning", "", now - 3600),
                                                      "progress": {"step": 3}})
    offset[0] = 0.0
    operator_labels = {"app_kubernetes_io_name": "kubetune", "app_kubernetes_io_instance": release,
                       "app_kubernetes_io_component": "operator"}
    exporter_labels = {"namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-9vq4t",
                       "container": "nvidia-dcgm-exporter", "service": "nvidia-dcgm-exporter",
                       "endpoint": "gpu-metrics"}
    with scraped(prometheus, f"{release}-kubetune-metrics", metrics.exposition, operator_labels), \
            scraped(prometheus, f"dcgm-honored-{suffix}", lambda: dcgm_text(honored), {}), \
            scraped(prometheus, f"dcgm-exported-{suffix}", lambda: dcgm_text(exported), exporter_labels):
        for query in (f'kubetune_run_pod_info{{namespace="{exported.namespace}"}}',
                      f'DCGM_FI_DEV_GPU_UTIL{{job="dcgm-honored-{suffix}"}}',
                      f'DCGM_FI_DEV_GPU_UTIL{{exported_pod="{exported.pod}"}}'):
            assert prometheus.wait_for_series(query, timeout=60), f"Prometheus never scraped {query}"
        yield World(release, honored, exported, prometheus)


def gpu_panels() -> list[tuple[str, str]]:
    from tests.unit.test_helm_chart import dashboards, panel_exprs

    return panel_exprs(dashboards()["gpu"])


def query(world: World, expr: str) -> list[dict[str, Any]]:
    runs = (world.honored, world.exported)
    expr = (expr.replace("$namespace", "|".join(r.namespace for r in runs)).replace("$run", ".*")
            .replace("${datasource}", ""))
    return world.prometheus.query(expr)


def by_run(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    return {(r["metric"]["namespace"], r["metric"]["name"]): float(r["value"][1]) for r in result}


def test_gpu_utilisation_of_long_named_runs_whatever_dcgms_honor_labels(world: World) -> None:
    panels = dict(gpu_panels())
    util = by_run(query(world, panels["GPU utilization"]))
    assert util == {(world.honored.namespace, world.honored.name): GPU_UTIL,
                    (world.exported.namespace, world.exported.name): GPU_UTIL}
    ratio = by_run(query(world, panels["GPU memory used (ratio)"]))
    assert ratio[(world.exported.namespace, world.exported.name)] == pytest.approx(FB_USED / (FB_USED + FB_FREE))
    efficiency = by_run(query(world, panels["Samples per second per GPU-utilization point"]))
    assert efficiency[(world.exported.namespace, world.exported.name)] == pytest.approx(SAMPLES_PER_SECOND / GPU_UTIL)


def test_every_gpu_panel_shows_both_runs_and_nothing_else(world: World) -> None:
    expected = {(world.honored.namespace, world.honored.name), (world.exported.namespace, world.exported.name)}
    for title, expr in gpu_panels():
        result = query(world, expr)
        assert {(r["metric"]["namespace"], r["metric"]["name"]) for r in result} == expected, title


def alert_exprs(release: str) -> dict[str, str]:
    out = helm.Chart.load(CHART).render({"metrics": {"prometheusRule": {"enabled": True}}}, name=release,
                                        namespace="kubetune-system", is_install=True)
    (rule,) = [d for d in yaml.safe_load_all(out["kubetune/templates/prometheusrule.yaml"]) if d]
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def test_alert_conditions_on_the_scraped_operator(world: World) -> None:
    exprs = alert_exprs(world.release)
    ns = world.honored.namespace
    assert world.prometheus.query(exprs["KubetuneOperatorDown"]) == []
    assert world.prometheus.query(alert_exprs(f"{world.release}-unscraped")["KubetuneOperatorDown"])
    assert set(by_run(world.prometheus.query(exprs["KubetuneRunPendingTooLong"]))) == {(ns, "waits")}
    assert set(by_run(world.prometheus.query(exprs["KubetuneRunStalled"]))) == {(ns, "stuck")}
    for quiet in ("KubetuneRunsFailing", "KubetuneReconcileErrors", "KubetuneStatusLagHigh"):
        assert world.prometheus.query(exprs[quiet]) == [], quiet
