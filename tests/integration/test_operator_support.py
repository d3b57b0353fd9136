"""Shared helpers and fixtures for the operator's integration and e2e tests (no tests here).

The operator runs as a real subprocess (``python -m kubetune.operator --namespace NS``) against the harness's
API server, exactly as it runs in a pod, minus the image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "finetunerun.yaml"
STANDIN_DIR = ROOT / "tests" / "images" / "standin"
STANDIN_IMAGE = "kubetune/standin:test"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetuneruns"
# What the stand-in trainer reports from its evaluations (tests/images/standin/standin.py).
STANDIN_BEFORE = {"recall_at_k": 0.25, "mrr": 0.1}
STANDIN_AFTER = {"recall_at_k": 0.75, "mrr": 0.5, "R@5": 0.75}


def wait_for(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.2) -> Any:
    """Poll ``fn`` until it returns something truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def kubectl(kubeconfig: str, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed: {proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"data": {"train": "s3://data/train.csv"},
                            "resources": {"gpus": 0, "cpu": "50m", "memory": "64Mi"}}
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneRun", "metadata": {"name": name}, "spec": body}


def standin(steps: int = 6, pace: float = 0.2, **behaviour: Any) -> dict[str, Any]:
    """spec.model for the stand-in trainer."""
    return {"name": "ViT-B-32", "config": {"standin": {"steps": steps, "pace": pace, **behaviour}}}


class Runs:
    """FinetuneRuns through the Kubernetes API (kubernetes client)."""

    def __init__(self, kube_api: Any, namespace: str) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(kube_api)
        self.batch = client.BatchV1Api(kube_api)
        self.core = client.CoreV1Api(kube_api)
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                            manifest)  # type: ignore[assignment]
        return created

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                         name)  # type: ignore[assignment]
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.get(name) or {}).get("status") or {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def jobs(self, name: str | None = None) -> list[Any]:
        selector = f"kubetune.io/run={name}" if name else "kubetune.io/run"
        return list(self.batch.list_namespaced_job(self.namespace, label_selector=selector).items)

    def config_maps(self, name: str) -> list[Any]:
        selector = f"kubetune.io/run={name}"
        return list(self.core.list_namespaced_config_map(self.namespace, label_selector=selector).items)

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace,
                                                field_selector=f"involvedObject.name={name}").items
        return [e for e in items if e.involved_object.kind == "FinetuneRun"]

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(name)).get("phase") == phase and s, timeout,
                        f"{name} to be {phase} (status: {self.status(name)})")


class OperatorProcess:
    """``python -m kubetune.operator`` watching one namespace: ``--standalone`` by default, or a candidate in the
    leader election on a Lease in ``lease_namespace``."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, env: dict[str, str] | None = None,
                 *, lease_namespace: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.lease_namespace = lease_namespace
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "KUBETUNE_TRAINER_IMAGE": STANDIN_IMAGE,
            "KUBETUNE_IMAGE_PULL_POLICY": "Never",
            "KUBETUNE_S3_SECRET": "",
            "KUBETUNE_TTL_CHECK_INTERVAL": "1",
            # the stand-in and the tiny trainer write little; the 20Gi default would fit a dozen pods on the node
            "KUBETUNE_EPHEMERAL_STORAGE": "1Gi",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready: bool = True) -> OperatorProcess:
        """Start and wait until it leads with kopf started (/readyz), or with ``ready=False`` only until it
        answers /healthz (a standby never gets ready)."""
        election = (["--leader-election-namespace", self.lease_namespace] if self.lease_namespace
                    else ["--standalone"])
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.operator", "--namespace", self.namespace, *election,
             "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port), "--verbose"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT))
        path = "/readyz" if ready else "/healthz"
        wait_for(lambda: self._running() and self.answer(path)[0] == 200, 30, f"the operator's {path}")
        return self

    def _running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def answer(self, path: str) -> tuple[int | None, str]:
        """(HTTP status, body) of a health endpoint; (None, error) when it does not answer."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=1) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return None, str(e)

    def ready(self) -> bool:
        """Leading with kopf started (/readyz 200)."""
        return self.answer("/readyz")[0] == 200

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGKILL after 20 s) and return the exit code; None when it was not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self, tail: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def crd_installed(cluster: Any) -> str:
    kubectl(cluster.kubeconfig, "apply", "-f", str(CRD_FILE))
    kubectl(cluster.kubeconfig, "wait", "--for=condition=Established", "--timeout=30s",
            "crd/finetuneruns.kubetune.io")
    return str(cluster.kubeconfig)


@pytest.fixture
def operator(cluster: Any, namespace: str, crd_installed: str, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    env = getattr(request, "param", None) or {}
    failed_before = request.session.testsfailed
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log", env=env).start()
    yield op
    op.stop()
    if request.session.testsfailed > failed_before:
        sys.stderr.write(f"\n--- operator log ({namespace}) ---\n{op.log()}\n")


@pytest.fixture
def runs(kube_api: Any, namespace: str) -> Runs:
    return Runs(kube_api, namespace)


@pytest.fixture(scope="session")
def standin_image(e2e_cluster: Any) -> str:
    e2e_cluster.build_image(STANDIN_IMAGE, STANDIN_DIR, build_args={"BASE_IMAGE": e2e_cluster.base_image})
    return STANDIN_IMAGE


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in status.get("conditions") or ():
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
