"""A fault that needs the real trainer: its pod deleted mid-run on the cluster. The replacement pod (Kubernetes
1.20 replaces a deleted pod within the Job) resumes from the store's latest checkpoint; the steps redone are
counted from the two pods' own event streams, and the artifact is complete."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.events import parse_line

from tests.cluster.s3 import S3Server
from tests.e2e.test_operator_trainer import TINY_CONFIG, dataset_in_s3, start_real_trainer_operator
from tests.integration.test_operator_support import (  # noqa: F401 - fixtures
    Runs,
    crd_installed,
    run_manifest,
    wait_for,
)

__all__ = ["dataset_in_s3"]

pytestmark = pytest.mark.e2e


class PodEvents:
    """Follows one pod's trainer log in a thread and keeps its structured events."""

    def __init__(self, runs: Runs, pod: str) -> None:
        self.events: list[Any] = []
        self.thread = threading.Thread(target=self._follow, args=(runs, pod), daemon=True)
        self.thread.start()

    def _follow(self, runs: Runs, pod: str) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:  # 400 while the container is being created: retry
                resp: Any = runs.core.read_namespaced_pod_log(pod, runs.namespace, container="trainer", follow=True,
                                                              _preload_content=False)
                break
            except ApiException as e:
                if e.status != 400:
                    return
                time.sleep(0.5)
        else:
            return
        buffer = b""
        try:
            for chunk in resp.stream():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = parse_line(line.decode("utf-8", "replace"))
                    if event is not None:
                        self.events.append(event)
        except Exception:  # the pod went away: keep what was read
            return

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]


def test_real_trainer_pod_deleted_mid_run_resumes_from_its_checkpoint(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, dataset_in_s3: str, tmp_path: Path) -> None:
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    try:
        runs.create(run_manifest(
            "kill-me", model={"name": "kt-tiny-kill", "config": TINY_CONFIG},
            data={"train": f"{dataset_in_s3}/train.csv", "eval": f"{dataset_in_s3}/eval.csv"},
            training={"epochs": 4, "batchSize": 32, "learningRate": 1e-3, "numWorkers": 0, "seed": 7},
            callbacks={"evaluation": {"enabled": False}},
            runPolicy={"checkpointEverySteps": 4, "checkpointEveryEpochs": 0},
            resources={"gpus": 0, "cpu": "1", "memory": "3Gi"}))
        first_pod = wait_for(lambda: runs.status("kill-me").get("podName"), 120, "the trainer pod")
        first = PodEvents(runs, first_pod)
        wait_for(lambda: first.of("checkpoint"), 240, "the first checkpoint")
        deleted = time.monotonic()
        runs.core.delete_namespaced_pod(first_pod, namespace)  # SIGTERM, then the grace period
        second_pod = wait_for(lambda: (p := runs.status("kill-me").get("podName")) not in (None, first_pod) and p,
                              120, "the replacement pod")
        second = PodEvents(runs, second_pod)
        final = runs.wait_phase("kill-me", "Succeeded", 240)
        elapsed = time.monotonic() - deleted
        second.thread.join(timeout=30)
    finally:
        operator.stop()

    # The deleted pod's log stream can end before the pod does: the trainer keeps training through the grace
    # period and checkpoints on SIGTERM, so it may have written checkpoints this reader never saw. Hence
    # "at least the latest checkpoint seen", and the last step reached is at least the resume step.
    (started,) = second.of("started")
    resumed = started.model_extra["resumed_from_step"]
    seen = [e.step for e in first.of("progress") + first.of("checkpoint") if e.step is not None]
    last_before = max([*seen, resumed])
    redone = last_before - resumed
    total = started.total_steps
    assert resumed >= max(e.step for e in first.of("checkpoint")), (resumed, first.of("checkpoint"))
    assert 0 <= redone <= 4, (last_before, resumed)  # at most one checkpoint interval
    assert all(e.step > resumed for e in second.of("progress")), second.of("progress")
    assert final["progress"]["step"] == total and final["artifact"]["sha256"]
    assert [j.metadata.name for j in runs.jobs("kill-me")] == ["kill-me-a1"]
    failed = first.of("failed")
    print(f"\nreal trainer pod deleted after step {last_before} ({failed[0].reason if failed else 'no failed event'}); "
          f"replacement resumed from step {resumed} of {total}: {redone} step(s) redone; Succeeded "
          f"{elapsed:.0f}s after the delete")
