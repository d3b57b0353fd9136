"""The harness end to end: a locally built image runs as a Job, its log is read through the API, and a pod
writes an object to the S3 server on the host IP that the test reads back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.cluster import ClusterInfo
from tests.cluster.s3 import S3Server

pytestmark = pytest.mark.e2e

SMOKE_DIR = Path(__file__).resolve().parents[1] / "images" / "smoke"
SMOKE_IMAGE = "kubetune/smoke:test"


@pytest.fixture(scope="module")
def smoke_image(e2e_cluster: ClusterInfo) -> str:
    e2e_cluster.build_image(SMOKE_IMAGE, SMOKE_DIR, wheels_for=("minio",))
    return SMOKE_IMAGE


def _job(name: str, image: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [{
                    "name": "main", "image": image, "imagePullPolicy": "Never", "args": args,
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                }],
            }},
        },
    }


def _wait_complete(batch: client.BatchV1Api, core: client.CoreV1Api, name: str, namespace: str,
                   timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job(name, namespace)
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Failed") == "True":
            pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
            logs = [core.read_namespaced_pod_log(p.metadata.name, namespace) for p in pods]
            pytest.fail(f"Job {name} failed: {logs}")
        if conditions.get("Complete") == "True":
            (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
            return str(core.read_namespaced_pod_log(pod.metadata.name, namespace))
        time.sleep(0.5)
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    pytest.fail(f"Job {name} not Complete after {timeout}s; pods: {[p.status.phase for p in pods]}")


def test_job_runs_local_image_and_log_is_readable(kube_api: Any, namespace: str, smoke_image: str) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    batch.create_namespaced_job(namespace, _job("hello", smoke_image, ["hello"]))
    log = _wait_complete(batch, core, "hello", namespace)
    assert "kubetune-smoke: hello from a pod" in log


def test_pod_writes_to_s3_on_host_ip(kube_api: Any, namespace: str, smoke_image: str, s3_server: S3Server,
                                     s3_bucket: str, s3_client: Any) -> None:
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    body = f"written by a pod {uuid.uuid4()}"
    env = {"S3_ENDPOINT": s3_server.pod_endpoint, "S3_BUCKET": s3_bucket, "S3_KEY": "from-pod/hello.txt",
           "S3_BODY": body, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    batch.create_namespaced_job(namespace, _job("s3put", smoke_image, ["s3-put"], env))
    _wait_complete(batch, core, "s3put", namespace)
    response = s3_client.get_object(s3_bucket, "from-pod/hello.txt")
    assert response.read().decode() == body
