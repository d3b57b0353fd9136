"""Session fixtures for real infrastructure: S3 (a SeaweedFS server), the Kubernetes cluster, Prometheus.

Fixture contract (stable; tests across the repo rely on it):
- ``s3_server`` (session): :class:`tests.cluster.s3.S3Server` with host/pod endpoints and credentials.
- ``s3_bucket`` (function): a fresh, empty bucket name on that server.
- ``s3_client`` (session): a ``minio.Minio`` client for the host endpoint.
- ``cluster`` (session): :class:`tests.cluster.cluster.ClusterInfo` (integration: an API server);
  ``.kubeconfig``, ``.host_ip``, ``.kind``, ``.can_run_pods``, ``.base_image``, ``.build_image(...)``.
- ``e2e_cluster`` (session): the same, but skips with the reason when the cluster cannot run pods.
- ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for the cluster.
- ``namespace`` (function): a fresh namespace, deleted after the test.
- ``prometheus`` (session): :class:`tests.cluster.prometheus.Prometheus`.
- ``simulated_kubelets`` (session): :class:`tests.cluster.simkubelet.SimulatedKubeletsProcess`, one simulated node
  (pods that select and tolerate ``kubetune.io/simulated`` run there); session-scoped so that it outlives every
  test's namespace (it removes their pods).

The cluster is started once per machine (``up`` is idempotent and locked), so parallel workers and
several developers' test runs share it; tests keep apart through their own namespaces and buckets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.cluster import ClusterInfo
from tests.cluster.objects import delete_namespace
from tests.cluster.prometheus import Prometheus, ensure_prometheus
from tests.cluster.s3 import S3Server, ensure_s3
from tests.cluster.system import HarnessError

_cluster_used: list[ClusterInfo] = []


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    return ensure_s3()


@pytest.fixture(scope="session")
def s3_client(s3_server: S3Server) -> Any:
    from minio import Minio

    return Minio(s3_server.host_endpoint.removeprefix("http://"), access_key=s3_server.access_key,
                 secret_key=s3_server.secret_key, secure=False, region=s3_server.region)


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    """A fresh bucket, emptied and removed after the test (the server is shared by every test on the machine)."""
    name = f"kt-{uuid.uuid4().hex[:12]}"
    s3_client.make_bucket(name)
    yield name
    from minio.deleteobjects import DeleteObject
    from minio.error import S3Error

    try:
        objects = [DeleteObject(o.object_name) for o in s3_client.list_objects(name, recursive=True)]
        errors = list(s3_client.remove_objects(name, objects)) if objects else []
        if not errors:
            s3_client.remove_bucket(name)
    except S3Error as err:
        if err.code != "NoSuchBucket":  # a test may remove its bucket itself
            raise


@pytest.fixture(scope="session")
def cluster() -> ClusterInfo:
    from tests.cluster.cluster import up

    try:
        info = up()
    except HarnessError as err:
        if "needs root" in str(err):
            pytest.skip(str(err))
        raise
    _cluster_used.append(info)
    return info


@pytest.fixture(scope="session")
def e2e_cluster(cluster: ClusterInfo) -> ClusterInfo:
    if not cluster.can_run_pods:
        pytest.skip(f"e2e needs pods: {cluster.reason_no_pods}")
    return cluster


@pytest.fixture(scope="session")
def kube_api(cluster: ClusterInfo) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=cluster.kubeconfig)


@pytest.fixture
def namespace(kube_api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    stem = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}})
    yield name
    delete_namespace(kube_api, name)


@pytest.fixture(scope="session")
def simulated_kubelets(e2e_cluster: ClusterInfo) -> Iterator[Any]:
    from tests.cluster.simkubelet import SimulatedKubeletsProcess

    sims = SimulatedKubeletsProcess(e2e_cluster.kubeconfig, prefix=f"sim-{uuid.uuid4().hex[:6]}").start()
    yield sims
    sims.stop()


@pytest.fixture(scope="session")
def prometheus() -> Prometheus:
    return ensure_prometheus()


TRAINER_IMAGE = "kubetune/trainer:dev"


@pytest.fixture(scope="session")
def trainer_image(e2e_cluster: ClusterInfo) -> str:
    from tests.cluster.images import ensure_project_image
    from tests.cluster.procs import machine_lock

    with machine_lock("image-trainer"):  # one build at a time across pytest workers
        return ensure_project_image(TRAINER_IMAGE, "trainer-image/Dockerfile", ("operator/kubetune", "trainer-image"),
                                    ("trainer", "onnx", "tracking"), build_args={"PIP_EXTRA_ARGS": "--no-index"})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _cluster_used:
        info = ClusterInfo.load() or _cluster_used[0]
        terminalreporter.write_sep("-", "kubetune test cluster")
        terminalreporter.write_line(f"{info.kind} cluster, KUBECONFIG={info.kubeconfig}")
        terminalreporter.write_line(f"harness timings: {info.timings.summary()}")
