"""The operator's own API client against the real API server: which 404 means "gone"."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf
import pytest
from kubetune.operator.kube import Kube, KubeError, pods_path

pytestmark = pytest.mark.integration


def _client(kubeconfig: str, monkeypatch: pytest.MonkeyPatch, retry_for: float) -> Kube:
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    info = kopf.login_with_kubeconfig(logger=logging.getLogger(__name__), settings=kopf.OperatorSettings())
    assert info is not None
    kube = Kube.from_connection_info(info)
    kube.retry_for = retry_for
    return kube


def test_a_missing_object_is_gone_at_once_an_unknown_resource_is_retried(
        cluster: Any, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = _client(cluster.kubeconfig, monkeypatch, retry_for=2.0)

    async def scenario() -> tuple[float, float, KubeError]:
        try:
            t0 = time.monotonic()
            assert await kube.get(pods_path(namespace, "no-such-pod")) is None  # NotFound naming the pod
            missing = time.monotonic() - t0
            t0 = time.monotonic()
            with pytest.raises(KubeError) as raised:  # what a CRD not loaded yet answers: no object named
                await kube.request("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/nosuchthings/x")
            return missing, time.monotonic() - t0, raised.value
        finally:
            await kube.close()

    missing, unknown, error = asyncio.run(scenario())
    assert missing < 1.0, missing
    assert error.status == 404 and error.object_name is None and error.transient
    assert unknown >= 1.0, unknown  # retried (0.5 s, 1 s backoff) within retry_for, then surfaced
