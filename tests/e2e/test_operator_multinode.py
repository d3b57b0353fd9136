"""A run over two pods on the harness cluster (Kubernetes 1.20: no Indexed Jobs, no cluster DNS): the operator
creates one Job per node rank and a Service in front of rank 0's pod, and the real trainer image trains the tiny
model with torchrun (static rendezvous, gloo) across the two pods.

- Its artifact equals, within 1e-5, a one-pod run of two processes with the same global batch and seed.
- A worker pod deleted mid-run fails the attempt as a unit: every pod of it is stopped, the retry's two new pods
  resume from the latest checkpoint, and nothing of the first attempt is left running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.events import parse_line
from kubetune.lifecycle.formats import parse_rfc3339
from safetensors.torch import load

from tests.cluster.s3 import S3Server
from tests.e2e.test_operator_trainer import TINY_CONFIG, dataset_in_s3, start_real_trainer_operator
from tests.e2e.test_reliability_trainer import PodEvents
from tests.integration.test_operator_support import (  # noqa: F401 - fixtures
    Runs,
    crd_installed,
    run_manifest,
    wait_for,
)

__all__ = ["dataset_in_s3"]

pytestmark = pytest.mark.e2e


def _manifest(name: str, data: str, resources: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return run_manifest(
        name, model={"name": "kt-tiny-multinode", "config": TINY_CONFIG},
        data={"train": f"{data}/train.csv"},
        training={"epochs": 3, "batchSize": 16, "learningRate": 2e-3, "numWorkers": 0, "seed": 11},
        callbacks={"evaluation": {"enabled": False}},
        resources={"gpus": 0, "memory": "2Gi", **resources}, **overrides)


def _weights(s3_client: Any, bucket: str, artifact: dict[str, Any]) -> dict[str, Any]:
    prefix = artifact["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
    return {f"{tower}:{key}": value
            for tower in ("clip-text", "clip-vision")
            for key, value in load(s3_client.get_object(bucket, f"{prefix}/{tower}/model.safetensors").read()).items()}


def _pods(runs: Runs, name: str, attempt: int) -> list[Any]:
    return list(runs.core.list_namespaced_pod(
        runs.namespace, label_selector=f"kubetune.io/run={name},kubetune.io/attempt={attempt}").items)


def test_two_pods_train_the_model_one_pod_with_two_processes_trains(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, s3_client: Any, dataset_in_s3: str,
        tmp_path: Path) -> None:
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    try:
        runs.create(_manifest("one-pod", dataset_in_s3, {"cpu": "2", "procsPerNode": 2}))
        single = runs.wait_phase("one-pod", "Succeeded", 300)
        applied = time.time()
        runs.create(_manifest("two-pods", dataset_in_s3, {"cpu": "1", "nodes": 2}))
        final = runs.wait_phase("two-pods", "Succeeded", 300)
    finally:
        operator.stop()

    jobs = {j.metadata.name: j for j in runs.jobs("two-pods")}
    assert sorted(jobs) == ["two-pods-a1", "two-pods-a1-n1"]
    assert all(j.status.succeeded == 1 for j in jobs.values())
    pods = {p.metadata.labels["kubetune.io/node-rank"]: p for p in _pods(runs, "two-pods", 1)}
    assert final["pods"] == [pods["0"].metadata.name, pods["1"].metadata.name]
    assert final["podName"] == pods["0"].metadata.name and final["progress"]["percent"] == 100
    service = runs.core.read_namespaced_service("kt-two-pods-a1", namespace)
    assert service.metadata.owner_references[0].name == "two-pods-a1"
    env = {e.name: e.value for e in pods["1"].spec.containers[0].env}
    assert env["KUBETUNE_NODE_RANK"] == "1" and env["KUBETUNE_RENDEZVOUS"] == f"{service.spec.cluster_ip}:29500"

    reference, multi = _weights(s3_client, s3_bucket, single["artifact"]), _weights(s3_client, s3_bucket,
                                                                                     final["artifact"])
    assert reference.keys() == multi.keys() and reference
    worst = max(float((reference[k].float() - multi[k].float()).abs().max()) for k in reference)
    assert worst <= 1e-5, worst
    stamped = [line.split(" ", 1) for line in runs.core.read_namespaced_pod_log(
        pods["0"].metadata.name, namespace, container="trainer", timestamps=True).splitlines() if " " in line]
    events = [(parse_rfc3339(stamp), e) for stamp, e in ((s, parse_line(rest)) for s, rest in stamped) if e]
    losses = [e.train_loss for _, e in events if e.type == "metrics" and e.train_loss is not None]
    assert losses[-1] < losses[0], losses  # the loss falls
    rendezvous = next(t for t, e in events if e.type == "started")
    running = max(c.state.terminated.started_at.timestamp() for p in pods.values()
                  for c in p.status.container_statuses)
    print(f"\ntwo pods: all running {running - applied:.1f}s and rendezvous done {(rendezvous or 0) - applied:.1f}s "
          f"after apply; samples/s 2 pods x 1 process {final['progress'].get('samplesPerSecond')} vs 1 pod x 2 "
          f"processes {single['progress'].get('samplesPerSecond')}; max |weight difference| {worst:.2e}; epoch "
          f"losses {[round(x, 3) for x in losses]}")


def test_a_deleted_worker_pod_retries_the_whole_unit_from_the_checkpoint(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, dataset_in_s3: str, tmp_path: Path) -> None:
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    try:
        runs.create(_manifest("lose-one", dataset_in_s3, {"cpu": "1", "nodes": 2},
                              runPolicy={"checkpointEverySteps": 3, "checkpointEveryEpochs": 0, "backoffLimit": 2}))
        first = wait_for(lambda: (p := runs.status("lose-one").get("pods")) and all(p) and p, 180, "both pods")
        rank0 = PodEvents(runs, first[0])
        wait_for(lambda: rank0.of("checkpoint"), 240, "the first checkpoint")
        runs.core.delete_namespaced_pod(first[1], namespace)  # the worker, not the pod whose log is followed
        final = runs.wait_phase("lose-one", "Succeeded", 300)
        second = final["pods"]
        retry = PodEvents(runs, second[0])
        retry.thread.join(timeout=30)
    finally:
        operator.stop()

    assert final["attempts"] == 2 and final["retries"] == 1
    assert not set(first) & set(second)  # both pods replaced
    retries = [e.message for e in runs.events("lose-one") if e.reason == "RetryableFailure"]
    assert any(f"Pod {first[1]} (node rank 1) was lost" in m for m in retries), retries  # the unit's own verdict
    alive = [p.metadata.name for p in _pods(runs, "lose-one", 1) if p.status.phase in ("Pending", "Running")]
    active = [j.metadata.name for j in runs.jobs("lose-one") if j.metadata.labels["kubetune.io/attempt"] == "1"
              and (j.status.active or 0) > 0]
    assert alive == [] and active == [], (alive, active)  # 0 orphans of the first attempt
    (started,) = retry.of("started")
    resumed = started.model_extra["resumed_from_step"]
    seen = max(e.step for e in rank0.of("progress") + rank0.of("checkpoint") if e.step is not None)
    assert resumed >= max(e.step for e in rank0.of("checkpoint"))
    assert 0 <= seen - resumed <= 3, (seen, resumed)  # at most one checkpoint interval redone
    assert final["progress"]["step"] == started.total_steps and final["artifact"]["sha256"]
    print(f"\nworker pod deleted after step {seen}; the retry's two new pods resumed from step {resumed}: "
          f"{seen - resumed} step(s) redone")
