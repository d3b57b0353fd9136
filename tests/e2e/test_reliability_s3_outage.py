"""S3 outages during a real training run (issue 7): the run's ``spec.output.endpoint`` points at a TCP proxy
(``tests.faults.TcpProxy``, on 0.0.0.0 so the trainer pod reaches it through the node IP) in front of the shared
SeaweedFS server. The proxy cuts S3 for 30 s when it sees the first checkpoint upload and again for 30 s when it sees
the first artifact upload. The trainer (the real image) rides out both in-process, with backoff (the store's
``RetryPolicy``, ``spec.output.retrySeconds``): one attempt, one pod, Succeeded, and the artifact in S3 matches its
manifest, whose sha256 is the status's. A permanently bad S3 configuration (a bucket that does not exist, an
endpoint nobody listens on) fails with the reason and the S3 error in the Failed condition."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.cluster.s3 import S3Server
from tests.e2e.test_operator_trainer import (
    TINY_CONFIG,
    assert_artifact_matches_manifest,
    dataset_in_s3,
    start_real_trainer_operator,
)
from tests.faults import TcpProxy
from tests.integration.test_operator_support import (  # noqa: F401 - fixtures
    Runs,
    crd_installed,
    run_manifest,
    wait_for,
)

__all__ = ["dataset_in_s3"]

pytestmark = pytest.mark.e2e

OUTAGE_S = 30.0
RETRY = re.compile(r"store: (\w+) (\S+) failed \((\w+)\), retry (\d+)/(\d+) in ([\d.]+)s")
RECOVERED = re.compile(r"store: (\w+) (\S+) succeeded on try (\d+) after ([\d.]+)s")


@pytest.fixture
def node_proxy(s3_server: S3Server) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the S3 server listening on 0.0.0.0, and its endpoint as pods see it (the node IP)."""
    target = urlparse(s3_server.host_endpoint)
    proxy = TcpProxy(str(target.hostname), int(target.port or 80), listen_host="0.0.0.0")
    yield proxy, proxy.endpoint_for(str(urlparse(s3_server.pod_endpoint).hostname))
    proxy.close()


def _trainer_log(runs: Runs, name: str) -> tuple[list[str], str]:
    pods = runs.core.list_namespaced_pod(runs.namespace, label_selector=f"kubetune.io/run={name}").items
    names = [str(p.metadata.name) for p in pods if p.metadata]
    return names, "".join(runs.core.read_namespaced_pod_log(n, runs.namespace, container="trainer") for n in names)


def _manifest(name: str, dataset: str, **output: Any) -> dict[str, Any]:
    return run_manifest(
        name, model={"name": f"kt-tiny-{name}", "config": TINY_CONFIG},
        data={"train": f"{dataset}/train.csv", "eval": f"{dataset}/eval.csv"},
        training={"epochs": 3, "batchSize": 32, "learningRate": 1e-3, "numWorkers": 0, "seed": 7},
        callbacks={"evaluation": {"enabled": False}},
        runPolicy={"checkpointEverySteps": 6, "checkpointEveryEpochs": 0, "backoffLimit": 0},
        resources={"gpus": 0, "cpu": "1", "memory": "3Gi"}, output=output)


def test_real_trainer_rides_out_30s_s3_outages_at_checkpoint_and_artifact_upload(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, s3_client: Any, dataset_in_s3: str,
        node_proxy: tuple[TcpProxy, str], tmp_path: Path) -> None:
    proxy, pod_endpoint = node_proxy
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    run_prefix = rf"^PUT /{s3_bucket}/kubetune/{namespace}/outage/[-0-9a-f]+"  # the run uid under its name
    at_checkpoint = proxy.outage_on(rf"{run_prefix}/checkpoints/step-", OUTAGE_S)
    at_artifact = proxy.outage_on(rf"{run_prefix}/artifact/", OUTAGE_S)
    # backoffLimit 0: a trainer that gave up on S3 would fail the run; only in-process retries can save it.
    try:
        created = time.monotonic()
        runs.create(_manifest("outage", dataset_in_s3, endpoint=pod_endpoint))
        final = runs.wait_phase("outage", "Succeeded", timeout=480)
        total = time.monotonic() - created
    finally:
        operator.stop()

    # Both outages happened where they were meant to, and lasted 30 s.
    for outage, where in ((at_checkpoint, "/checkpoints/step-"), (at_artifact, "/artifact/")):
        assert outage.trigger and where in outage.trigger, (where, outage.trigger, proxy.requests[-20:])
        assert outage.done.is_set() and outage.duration == pytest.approx(OUTAGE_S, abs=1.0)
    assert proxy.refused > 0, "no connection was refused during the outages"

    # One attempt, one pod: the trainer retried in-process (its log says how), the Job never restarted it.
    assert final.get("attempts") in (1, None) and not final.get("retries"), final
    pods, log = _trainer_log(runs, "outage")
    assert len(pods) == 1 and [j.metadata.name for j in runs.jobs("outage")] == ["outage-a1"], pods
    retries = RETRY.findall(log)
    recovered = [(op, uri, int(tries), float(after)) for op, uri, tries, after in RECOVERED.findall(log)]
    slow = {"checkpoint": [r for r in recovered if "/checkpoints/step-" in r[1]],
            "artifact": [r for r in recovered if "/artifact/" in r[1]]}
    for what, items in slow.items():
        assert items, f"no {what} upload retried: {recovered}"
        assert items[0][3] >= OUTAGE_S - 2.0, (what, items)  # the upload waited the outage out
    assert len(retries) >= 2 * 6, retries  # ≥ 6 tries per 30 s outage (0.5, 1, 2, 4, 8, 15 s apart)
    assert "StoreUnavailable" not in log and "Traceback" not in log

    # The artifact: complete, the files' sha256 match the manifest, the manifest's sha256 is the status's.
    assert final["progress"]["percent"] == pytest.approx(100.0) and final["artifact"]["sha256"]
    files = assert_artifact_matches_manifest(s3_client, s3_bucket, final["artifact"],
                                             secrets=[s3_server.secret_key.encode(), s3_server.access_key.encode()])

    start = at_checkpoint.started or created
    print(f"\nS3 outages through the proxy, run total {total:.0f}s (create → Succeeded):")
    for outage, items in ((at_checkpoint, slow["checkpoint"]), (at_artifact, slow["artifact"])):
        assert outage.started is not None and outage.ended is not None
        print(f"  outage {outage.started - created:6.1f}s → {outage.ended - created:6.1f}s after create "
              f"({outage.duration:.1f}s) on {outage.trigger}; the upload took {items[0][3]:.1f}s "
              f"(try {items[0][2]})")
    print(f"  {len(retries)} in-process retries in the trainer log, {proxy.refused} connections refused, "
          f"1 attempt/1 pod; artifact: {len(files)} files match the manifest "
          f"(sha256 {final['artifact']['sha256'][:12]}…); first outage {start - created:.0f}s after create")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def test_real_trainer_with_a_permanently_bad_s3_config_fails_with_a_clear_reason(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, dataset_in_s3: str, tmp_path: Path) -> None:
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    node = str(urlparse(s3_server.pod_endpoint).hostname)
    try:
        created = time.monotonic()
        # A bucket that does not exist: refused by S3 before training, not retried (exit 78, permanent).
        runs.create(_manifest("no-bucket", dataset_in_s3, bucket="kt-no-such-bucket-e2e"))
        # An endpoint nobody listens on: unreachable, retried for retrySeconds, then retryable; backoffLimit 0.
        runs.create(_manifest("no-endpoint", dataset_in_s3, endpoint=f"http://{node}:{_closed_port()}",
                              retrySeconds=3))
        bad_bucket = runs.wait_phase("no-bucket", "Failed", timeout=240)
        bad_bucket_s = time.monotonic() - created
        bad_endpoint = runs.wait_phase("no-endpoint", "Failed", timeout=240)
        bad_endpoint_s = time.monotonic() - created
    finally:
        operator.stop()

    def failed(status: dict[str, Any]) -> dict[str, Any]:
        (condition,) = [c for c in status["conditions"] if c["type"] == "Failed"]
        assert condition["status"] == "True", condition
        return dict(condition)

    bucket_cond, endpoint_cond = failed(bad_bucket), failed(bad_endpoint)
    assert bucket_cond["reason"] == "StorageRejected", bucket_cond
    assert "NoSuchBucket" in bucket_cond["message"] and "kt-no-such-bucket-e2e" in bucket_cond["message"]
    assert not bad_bucket.get("checkpoint"), bad_bucket  # refused up front, not at the first checkpoint
    assert endpoint_cond["reason"] in ("BackoffLimitExceeded", "StorageUnavailable"), endpoint_cond
    assert "StorageUnavailable" in endpoint_cond["message"] or "unreachable" in endpoint_cond["message"], \
        endpoint_cond
    for cond in (bucket_cond, endpoint_cond):
        assert s3_server.secret_key not in cond["message"] and s3_server.access_key not in cond["message"]
    print(f"\nbad bucket: Failed/{bucket_cond['reason']} after {bad_bucket_s:.0f}s: {bucket_cond['message']}"
          f"\nendpoint nobody listens on: Failed/{endpoint_cond['reason']} after {bad_endpoint_s:.0f}s: "
          f"{endpoint_cond['message']}")
