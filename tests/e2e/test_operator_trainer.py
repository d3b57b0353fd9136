"""The whole product path with real parts: a FinetuneRun applied to the harness cluster, the operator (a real
subprocess) runs the **real trainer image** as a Job, the trainer pulls data from the real S3 server, trains a
tiny open_clip CLIP on CPU, evaluates before/after, and publishes the artifact; the status shows progress,
metrics and the log tail while it runs, and the artifact's manifest sha256 at the end. The S3 credentials
appear nowhere: status, Events, the operator's and the trainer's logs, the children, the artifact files."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from kubetune.storage import s3_store

from tests.cluster.s3 import S3Server
from tests.integration.test_operator_support import (  # noqa: F401 - fixtures
    OperatorProcess,
    Runs,
    crd_installed,
    run_manifest,
    wait_for,
)

pytestmark = pytest.mark.e2e

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def dataset_in_s3(tmp_path: Path, s3_server: S3Server, s3_bucket: str,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    out = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "kubetune_trainer.synthetic", str(out), "--n", "192", "--eval-n", "48",
                    "--size", "32"], check=True, capture_output=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/data").put_dir("", out)
    return f"s3://{s3_bucket}/data"


def _credentials_secret(runs: Runs, s3_server: S3Server) -> str:
    runs.core.create_namespaced_secret(runs.namespace, {
        "metadata": {"name": "s3-creds"},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
                 "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode()},
    })
    return "s3-creds"


def start_real_trainer_operator(cluster: Any, runs: Runs, trainer_image: str, s3_server: S3Server, s3_bucket: str,
                                tmp_path: Path) -> OperatorProcess:
    """The operator (a subprocess) for the run's namespace, defaulting runs to the real trainer image and the
    test's bucket, with the S3 credentials in a Secret it passes by reference."""
    secret = _credentials_secret(runs, s3_server)
    return OperatorProcess(cluster.kubeconfig, runs.namespace, tmp_path / "operator.log", env={
        "KUBETUNE_TRAINER_IMAGE": trainer_image, "KUBETUNE_IMAGE_PULL_POLICY": "Never",
        "KUBETUNE_S3_ENDPOINT": s3_server.pod_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket,
        "KUBETUNE_S3_SECRET": secret, "KUBETUNE_STATUS_INTERVAL": "0.5",
    }).start()


def assert_artifact_matches_manifest(s3_client: Any, bucket: str, artifact: dict[str, Any],
                                     secrets: Sequence[bytes] = ()) -> dict[str, dict[str, Any]]:
    """``status.artifact`` against S3: the manifest's sha256 is the status's, every file in the manifest has its
    sha256 and size, text and vision towers are there, and no credential is inside a file. Returns the files."""
    key = artifact["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
    manifest_bytes = s3_client.get_object(bucket, f"{key}/manifest.json").read()
    assert hashlib.sha256(manifest_bytes).hexdigest() == artifact["sha256"]
    files: dict[str, dict[str, Any]] = json.loads(manifest_bytes)["files"]
    assert any(n.startswith("clip-text/") for n in files) and any(n.startswith("clip-vision/") for n in files)
    for path, entry in files.items():
        body = s3_client.get_object(bucket, f"{key}/{path}").read()
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["size"]), path
        assert not [s for s in secrets if s in body], f"a credential inside the artifact file {path}"
    return files


def test_real_trainer_runs_to_succeeded_with_live_status_and_artifact(
        e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str,  # noqa: F811
        trainer_image: str, s3_server: S3Server, s3_bucket: str, s3_client: Any, dataset_in_s3: str,
        tmp_path: Path) -> None:
    runs = Runs(kube_api, namespace)
    operator = start_real_trainer_operator(e2e_cluster, runs, trainer_image, s3_server, s3_bucket, tmp_path)
    try:
        manifest = run_manifest(
            "tiny-clip",
            model={"name": "kt-tiny-e2e", "config": TINY_CONFIG},
            data={"train": f"{dataset_in_s3}/train.csv", "eval": f"{dataset_in_s3}/eval.csv"},
            training={"epochs": 3, "batchSize": 32, "learningRate": 1e-3, "numWorkers": 0, "warmupSteps": 2,
                      "seed": 7},
            callbacks={"evaluation": {"limit": 10}},
            resources={"gpus": 0, "cpu": "1", "memory": "3Gi"},
        )
        runs.create(manifest)

        # While it runs: progress, a log tail and the before-training evaluation appear in the status.
        running = wait_for(lambda: (s := runs.status("tiny-clip")).get("phase") in ("Running", "Succeeded")
                           and (s.get("progress") or {}).get("step") and s, 240,
                           "the run to report progress")
        assert running["logTail"], running
        final = runs.wait_phase("tiny-clip", "Succeeded", timeout=300)
    finally:
        operator.stop()
    log = operator.log()

    # Status: progress complete, metrics before/after computed, artifact with size and sha256.
    assert final["progress"]["percent"] == pytest.approx(100.0), final["progress"]
    metrics = final["metrics"]
    assert metrics["before"] and metrics["after"], metrics
    assert metrics["trainLoss"] is not None
    artifact = final["artifact"]
    assert artifact["uri"].startswith(f"s3://{s3_bucket}/"), artifact
    assert len(final["logTail"]) <= 30
    assert len(json.dumps(final)) < 16_384  # a run never makes its object large

    # The artifact in S3: the manifest's sha256 is the one in status, and every file matches the manifest.
    assert_artifact_matches_manifest(s3_client, s3_bucket, artifact,
                                     secrets=[s3_server.secret_key.encode(), s3_server.access_key.encode()])

    # Secrets never appear in status, events, the operator's log, the trainer pod's log, the children.
    events = json.dumps([e.message for e in runs.events("tiny-clip")])
    pods = runs.core.list_namespaced_pod(namespace, label_selector="kubetune.io/run=tiny-clip").items
    assert pods
    pod_names = [str(runs.core.api_client.sanitize_for_serialization(p)["metadata"]["name"]) for p in pods]
    trainer_log = "".join(runs.core.read_namespaced_pod_log(n, namespace, container="trainer") for n in pod_names)
    assert "KUBETUNE_EVENT" in trainer_log  # the scan reads the real log
    children = json.dumps(runs.core.api_client.sanitize_for_serialization(
        [*runs.config_maps("tiny-clip"), *runs.jobs("tiny-clip")]))
    for where, text in (("status", json.dumps(final)), ("events", events), ("operator log", log),
                        ("trainer log", trainer_log), ("ConfigMap/Job", children)):
        assert s3_server.secret_key not in text, where
        assert s3_server.access_key not in text, where
