"""Fixtures of the e2e tests."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.s3 import S3Server
from tests.integration.test_operator_support import OperatorProcess, crd_installed

__all__ = ["crd_installed"]


@pytest.fixture
def trainer_operator(e2e_cluster: Any, kube_api: Any, namespace: str, crd_installed: str, trainer_image: str,
                     s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator (a subprocess) watching ``namespace``, its Jobs running the real trainer image with the S3
    server's credentials from a Secret, as a platform team's install does."""
    from kubernetes.client import CoreV1Api

    CoreV1Api(kube_api).create_namespaced_secret(namespace, {"metadata": {"name": "s3-creds"}, "data": {
        "AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode()}})
    operator = OperatorProcess(e2e_cluster.kubeconfig, namespace, tmp_path / "operator.log", env={
        "KUBETUNE_TRAINER_IMAGE": trainer_image, "KUBETUNE_IMAGE_PULL_POLICY": "Never",
        "KUBETUNE_S3_ENDPOINT": s3_server.pod_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket,
        "KUBETUNE_S3_SECRET": "s3-creds"}).start()
    try:
        yield operator
    finally:
        operator.stop()
