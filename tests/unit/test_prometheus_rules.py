"""The chart's alerts, evaluated by Prometheus's own rule engine (``promtool test rules``: alerts at given times,
``for`` included, no waiting) on what a scrape of the operator would store: series taken from the operator's real
:class:`~kubetune.operator.metrics.Metrics`, driven minute by minute on a simulated clock, and labelled the way
a ServiceMonitor (``honorLabels``, ``podTargetLabels``) or a pod-annotation scrape job (``honor_labels``, labelmap
of the pod's labels) labels them. A second release's operator is scraped beside it: its runs never fire this
release's alerts.

Each alert that must fire fires on series that mean it, naming the run where it is about one; normal use (a run
that waits a little, one user error among successes, one handler error, a restart of the operator) fires none.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.lifecycle.conditions import transition
from kubetune.lifecycle.formats import now_rfc3339
from kubetune.operator.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families

helm = pytest.importorskip("helm_python")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
RELEASE, NS = "kt", "kubetune-system"
CHART_POD_LABELS = {"app_kubernetes_io_name": "kubetune", "app_kubernetes_io_instance": RELEASE,
                    "app_kubernetes_io_component": "operator"}
OPERATOR_POD = "kt-kubetune-5d9c7b6f4-x2x9z"
# Target labels as prometheus-operator's relabelings give a ServiceMonitor endpoint (podTargetLabels included).
SERVICE_MONITOR = {"job": "kt-kubetune-metrics", "namespace": NS, "service": "kt-kubetune-metrics",
                   "endpoint": "metrics", "pod": OPERATOR_POD, "container": "operator",
                   "instance": "10.244.0.17:8080", **CHART_POD_LABELS}
# ... and as the Prometheus Helm chart's `kubernetes-pods` job gives a pod annotated prometheus.io/scrape.
POD_ANNOTATIONS = {"job": "kubernetes-pods", "namespace": NS, "pod": OPERATOR_POD, "instance": "10.244.0.17:8080",
                   "pod_template_hash": "5d9c7b6f4", **CHART_POD_LABELS}
OTHER_RELEASE = {**SERVICE_MONITOR, "job": "other-kubetune-metrics", "pod": "other-kubetune-7c4d-abcde",
                 "instance": "10.244.0.18:8080", "app_kubernetes_io_instance": "other"}
STYLES = pytest.mark.parametrize("scrape", [SERVICE_MONITOR, POD_ANNOTATIONS], ids=["servicemonitor", "annotations"])


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


@pytest.fixture(scope="module")
def rules_file(promtool: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's PrometheusRule as a rule file, checked by ``promtool check rules``. The descriptions are left
    out of the unit tests (promtool compares annotations whole, and their counts depend on ``increase()``'s
    extrapolation); the check parses their templates, and each test checks the summary exactly."""
    out = helm.Chart.load(CHART).render({"metrics": {"prometheusRule": {"enabled": True}}}, name=RELEASE,
                                        namespace=NS, is_install=True)
    (rule,) = [d for d in yaml.safe_load_all(out["kubetune/templates/prometheusrule.yaml"]) if d]
    groups = rule["spec"]["groups"]
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "6 rules found" in check.stdout, check.stdout + check.stderr
    for group in groups:
        for r in group["rules"]:
            r["annotations"].pop("description")
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


class Operator:
    """One operator process's real metrics on a simulated clock, and what a scrape once a minute stored of them,
    labelled as ``target`` (the exposed labels win: honorLabels)."""

    def __init__(self, target: dict[str, str]) -> None:
        self.target = target
        self.now = 0.0
        self.metrics = Metrics(lambda: self.now)
        self.state = "ok"  # "failed": the scrape fails (up 0); "gone": no target any more
        self.scrapes: list[tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = []

    @property
    def table(self) -> Any:
        return self.metrics.table

    def restart(self) -> None:
        """A new process: its table is empty until the FinetuneRun watch lists the runs again."""
        self.metrics = Metrics(lambda: self.now)

    def scrape(self) -> None:
        samples = {}
        if self.state == "ok":
            for family in text_string_to_metric_families(self.metrics.exposition().decode()):
                for s in family.samples:
                    if s.name.startswith("kubetune_") and not s.name.endswith("_created"):
                        samples[(s.name, tuple(sorted({**self.target, **s.labels}.items())))] = s.value
        self.scrapes.append((self.state, samples))

    def series(self) -> list[dict[str, str]]:
        """promtool's input series: a value per minute, ``stale`` where a series left the scrape (as Prometheus
        marks it), ``_`` where there is none."""
        keys = {key for _, samples in self.scrapes for key in samples}
        out = [{"series": _selector("up", tuple(sorted(self.target.items()))),
                "values": " ".join({"ok": "1", "failed": "0"}.get(state, "stale" if i and self.scrapes[i - 1][0]
                                                                   != "gone" else "_")
                                   for i, (state, _) in enumerate(self.scrapes))}]
        for name, labels in sorted(keys):
            values, present = [], False
            for _, samples in self.scrapes:
                value = samples.get((name, labels))
                values.append(repr(value) if value is not None else "stale" if present else "_")
                present = value is not None
            out.append({"series": _selector(name, labels), "values": " ".join(values)})
        return out


def _selector(name: str, labels: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"{name}{{{body}}}"


def simulate(operators: list[Operator], minutes: int, step: Callable[[int], None]) -> list[dict[str, str]]:
    """Minute 0..``minutes``: move the clocks, let ``step`` act, scrape every operator."""
    for minute in range(minutes + 1):
        for op in operators:
            op.now = minute * 60.0
        step(minute)
        for op in operators:
            op.scrape()
    return [s for op in operators for s in op.series()]


def fires(minute: int, alert: str, *alerts: tuple[dict[str, str], str]) -> dict[str, Any]:
    """``alert`` at ``minute``: exactly ``alerts`` (its labels, its summary); none when empty."""
    return {"eval_time": f"{minute}m", "alertname": alert,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": {"summary": summary}}
                           for labels, summary in alerts]}


def promtool_test(promtool: str, rules: Path, *tests: tuple[list[dict[str, str]], list[dict[str, Any]]]) -> None:
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases} for series, cases in tests]}
    path = rules.parent / "test.yaml"
    path.write_text(yaml.safe_dump(spec, width=1 << 20))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def pending(created_minute: int) -> tuple[dict[str, Any], str]:
    return {"phase": "Pending"}, now_rfc3339(created_minute * 60.0)


def run(namespace: str, name: str) -> dict[str, str]:
    return {"severity": "warning", "namespace": namespace, "name": name}


# ------------------------------------------------------------------------------------------ per run
@STYLES
def test_a_run_pending_too_long_fires_naming_it_even_across_an_operator_restart(
        promtool: str, rules_file: Path, scrape: dict[str, str]) -> None:
    ours, other = Operator(scrape), Operator(OTHER_RELEASE)
    created = now_rfc3339(0.0)
    statuses = {"waits": {"phase": "Pending"}, "starts": {"phase": "Pending"}}

    def step(minute: int) -> None:
        if minute == 10:  # "starts" got its GPU after 10 minutes: normal
            statuses["starts"] = transition(statuses["starts"], "Running", "PodRunning", "", 600.0)
        if minute == 20:
            ours.restart()
            ours.state = "failed"
        if minute == 21:  # the new process lists the runs again
            ours.state = "ok"
        if minute in (0, 10) or minute >= 21:
            for name, status in statuses.items():
                ours.table.update("team-a", name, status, created=created)
        if minute == 0:
            other.table.update("team-b", "elsewhere", {"phase": "Pending"}, created=created)

    series = simulate([ours, other], 40, step)
    promtool_test(promtool, rules_file, (series, [
        fires(29, "KubetuneRunPendingTooLong"),
        fires(31, "KubetuneRunPendingTooLong",
              (run("team-a", "waits"), "FinetuneRun team-a/waits has been Pending for 31m 0s.")),
        fires(40, "KubetuneRunPendingTooLong",
              (run("team-a", "waits"), "FinetuneRun team-a/waits has been Pending for 40m 0s.")),
    ]))


def test_a_running_run_whose_step_stands_still_fires_naming_it(promtool: str, rules_file: Path) -> None:
    ours = Operator(SERVICE_MONITOR)
    running = transition({}, "Running", "PodRunning", "", 0.0)

    def step(minute: int) -> None:
        ours.table.update("team-a", "moving", {**running, "progress": {"step": minute * 10}})
        ours.table.update("team-a", "stuck", {**running, "progress": {"step": min(minute, 10) * 10}})
        ours.table.update("team-a", "queued", {"phase": "Pending"})  # no step at all: not stalled

    series = simulate([ours], 60, step)
    promtool_test(promtool, rules_file, (series, [
        fires(39, "KubetuneRunStalled"),
        fires(41, "KubetuneRunStalled",
              (run("team-a", "stuck"), "FinetuneRun team-a/stuck has made no training progress for 31m 0s.")),
    ]))


# ------------------------------------------------------------------------------------------ release-wide
def _finishing(outcomes: dict[int, str]) -> list[dict[str, str]]:
    """Runs finishing at the given minutes (Succeeded or Failed), as this release's operator counts them."""
    ours = Operator(SERVICE_MONITOR)

    def step(minute: int) -> None:
        if minute in outcomes:
            ours.metrics.transition("Running", outcomes[minute])

    return simulate([ours], 90, step)


def test_runs_failing_fires_on_a_failure_ratio_not_on_one_users_error(promtool: str, rules_file: Path) -> None:
    failing = "Many FinetuneRuns are failing."
    one_error_among_successes = _finishing({**{m: "Succeeded" for m in range(5, 15)}, 15: "Failed"})
    one_error_alone = _finishing({5: "Failed"})
    most_fail = _finishing({5: "Succeeded", 6: "Failed", 8: "Failed", 10: "Failed", 12: "Failed"})
    promtool_test(promtool, rules_file,
                  (one_error_among_successes, [fires(m, "KubetuneRunsFailing") for m in (20, 30, 60)]),
                  (one_error_alone, [fires(m, "KubetuneRunsFailing") for m in (10, 30, 60)]),
                  (most_fail, [fires(20, "KubetuneRunsFailing", ({"severity": "warning"}, failing)),
                               fires(60, "KubetuneRunsFailing", ({"severity": "warning"}, failing)),
                               fires(85, "KubetuneRunsFailing")]))  # an hour later: resolved


def test_reconcile_errors_fire_for_a_handler_that_keeps_failing(promtool: str, rules_file: Path) -> None:
    ours = Operator(SERVICE_MONITOR)

    def fail(handler: str) -> None:
        with pytest.raises(RuntimeError), ours.metrics.counting_errors(handler):
            raise RuntimeError("API server said 500")

    def step(minute: int) -> None:
        if minute == 5:
            fail("update")  # once: kopf retried and it went through
        if 10 <= minute <= 60 and minute % 2 == 0:
            fail("supervisor")

    series = simulate([ours], 60, step)
    summary = "The kubetune operator's supervisor handler keeps failing."
    promtool_test(promtool, rules_file, (series, [
        fires(15, "KubetuneReconcileErrors"),
        fires(30, "KubetuneReconcileErrors", ({"severity": "warning", "handler": "supervisor"}, summary)),
    ]))


@STYLES
def test_operator_down_fires_when_this_release_is_not_scraped(promtool: str, rules_file: Path,
                                                               scrape: dict[str, str]) -> None:
    """The alert the review saw firing for ever under a pod-annotation scrape: quiet while either scrape sees the
    operator, firing when this release's operator is gone although another release's is up."""
    ours, other = Operator(scrape), Operator(OTHER_RELEASE)

    def step(minute: int) -> None:
        if minute == 0:
            ours.table.update("team-a", "a", {"phase": "Running"})
        if minute == 11:
            ours.state = "failed"
        if minute == 13:
            ours.state = "gone"

    series = simulate([ours, other], 30, step)
    down = ({"severity": "critical"}, "The kubetune operator is down or not scraped.")
    promtool_test(promtool, rules_file, (series, [
        fires(10, "KubetuneOperatorDown"),
        fires(15, "KubetuneOperatorDown"),  # not yet for 5 minutes
        fires(17, "KubetuneOperatorDown", down),
    ]))
