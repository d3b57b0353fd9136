"""Many concurrently running, logging trainers through the real API server, on simulated kubelets
(:mod:`tests.cluster.simkubelet`): the small, fast version of ``bench/operator_scale.py --simulated``.

Every run's pod is bound by the real scheduler to a simulated node whose "kubelet" serves the real trainer's event
stream; the operator follows each log API server → kubelet as in production. Each run must end Succeeded with the
status its stream ended with (last step, artifact, after-evaluation), within a bounded status lag, with no
log-open error left unexplained.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_operator_support import (
    Runs,
    crd_installed,
    operator,
    run_manifest,
    runs,
    standin,
    wait_for,
)

__all__ = ["crd_installed", "operator", "runs"]

pytestmark = pytest.mark.e2e

N_RUNS = 40
STEPS = 8
PACE = 1.0
SIMULATED = {"nodeSelector": {"kubetune.io/simulated": "true"},
             "tolerations": [{"key": "kubetune.io/simulated", "operator": "Exists", "effect": "NoSchedule"}]}


def test_concurrent_logging_runs_on_simulated_kubelets_end_with_their_streams_last_state(
        simulated_kubelets: Any, operator: Any, runs: Runs) -> None:
    for i in range(N_RUNS):
        runs.create(run_manifest(f"s{i}", model=standin(steps=STEPS, pace=PACE), training={"epochs": 2},
                                 resources={"gpus": 0, "cpu": "1m", "memory": "16Mi", **SIMULATED}))

    def phases() -> list[str | None]:
        return [runs.status(f"s{i}").get("phase") for i in range(N_RUNS)]

    wait_for(lambda: all(p in ("Succeeded", "Failed") for p in phases()), 240, "every simulated run to end",
             interval=2.0)
    for i in range(N_RUNS):
        status = runs.status(f"s{i}")
        assert status["phase"] == "Succeeded", status
        assert status["progress"]["step"] == STEPS and status["progress"]["percent"] == 100, status
        assert status["artifact"]["uri"].endswith(f"/s{i}/"), status
        assert status["metrics"]["after"]["R@5"] == 0.75, status
        node = str(runs.core.read_namespaced_pod(status["podName"], runs.namespace).spec.node_name)  # type: ignore[union-attr]
        assert node.startswith(simulated_kubelets.prefix), node

    metrics = operator.metrics()
    streams = [line for line in metrics.splitlines()
               if line.startswith('kubetune_api_requests_total{code="2xx",verb="STREAM"}')]
    assert streams and float(streams[0].split()[-1]) >= N_RUNS, streams
    lag = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in metrics.splitlines()
           if line.startswith("kubetune_status_lag_seconds_bucket")}
    # Every line the status showed was there within 10 s of the trainer writing it, on a loaded 2-core machine.
    assert lag["10.0"] == lag["+Inf"] > 0, lag
