"""KUBEBUILDER_ASSETS (the envtest convention): the harness starts a control plane only, from the given
etcd + kube-apiserver, in its own state dir and ports, and stops it again without touching the main cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.build import cached_binaries
from tests.cluster.cluster import ClusterInfo
from tests.cluster.paths import REPO_ROOT

pytestmark = pytest.mark.integration


def test_control_plane_only_from_kubebuilder_assets(cluster: ClusterInfo, tmp_path: Path) -> None:
    bin_dir = cached_binaries()
    etcd = shutil.which("etcd")
    if cluster.kind != "harness" or bin_dir is None or etcd is None:
        pytest.skip("needs the harness's own Kubernetes build to assemble a KUBEBUILDER_ASSETS directory")
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "kube-apiserver").symlink_to(bin_dir / "kube-apiserver")
    (assets / "etcd").symlink_to(etcd)
    env = dict(os.environ, KUBEBUILDER_ASSETS=str(assets), KUBETUNE_STATE_DIR=str(tmp_path / "state"),
               KUBETUNE_APISERVER_PORT="16443", KUBETUNE_ETCD_PORT="12379", KUBETUNE_ETCD_PEER_PORT="12380",
               KUBETUNE_S3_PORT="19001", KUBETUNE_PROMETHEUS_PORT="19091")
    env.pop("KUBECONFIG", None)

    def harness(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tests.cluster", *args], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)

    try:
        up = harness("up")
        assert up.returncode == 0, up.stdout
        assert "cluster (kubebuilder) up" in up.stdout
        assert "e2e tests will skip: KUBEBUILDER_ASSETS gives a control plane only" in up.stdout
        kubeconfig = tmp_path / "state" / "admin.kubeconfig"
        ns = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "namespaces", "-o", "name"],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert "namespace/default" in ns.stdout
    finally:
        down = harness("down")
    assert down.returncode == 0, down.stdout
    for port in (16443, 12379, 19001, 19091):  # nothing of that control plane (nor its S3/Prometheus) is left
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"
    status = subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "get", "--raw", "/readyz"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert status.stdout.strip() == "ok"  # the main cluster is untouched
