"""Fixtures of the unit tests."""

from __future__ import annotations

import copy
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubetune.sdk.client import Client
from kubetune.storage import LocalStore
from urllib3.exceptions import ProtocolError

FAKE_TRAINER = r'''#!{python}
"""Stands for `python -m kubetune_trainer --config C --output-dir O --run-name N`."""
import json, os, sys, time
args = sys.argv[sys.argv.index("--config"):]
opts = dict(zip(args[::2], args[1::2]))
out = opts["--output-dir"]
mode = os.environ.get("FAKE_MODE", "ok")
def emit(kind, **f):
    print("KUBETUNE_EVENT " + json.dumps({{"v": 1, "type": kind, "time": time.time(), **f}}), flush=True)
print("2026-01-01 00:00:00,000 INFO kubetune_trainer: loading train set", file=sys.stderr, flush=True)
emit("started", run=opts["--run-name"], model="m", epochs=2, total_steps=4)
emit("evaluation", stage="before", epoch=0, metrics={{"R@1": 0.1, "R@5": 0.3, "mean_rank": 9.0}})
for step in range(1, 5):
    emit("progress", epoch=(step + 1) // 2, epochs=2, step=step, total_steps=4, loss=2.0 / step,
         samples_per_second=100.0, eta_seconds=4 - step)
    print(f"step {{step}}", flush=True)
    if mode == "fail" and step == 2:
        emit("failed", reason="InvalidData", message="row 3: image x.png not found", retryable=False, exit_code=65)
        sys.exit(65)
    if mode == "hang" and step == 2:
        time.sleep(300)
    if mode == "crash" and step == 2:
        print("Traceback: boom", file=sys.stderr, flush=True)
        sys.exit(1)
emit("metrics", stage="val", epoch=2, step=4, train_loss=0.5, val_loss=0.6)
emit("evaluation", stage="after", epoch=2, metrics={{"R@1": 0.6, "R@5": 0.9, "mean_rank": 2.0}})
os.makedirs(os.path.join(out, "artifact"), exist_ok=True)
open(os.path.join(out, "artifact", "manifest.json"), "w").write("{{}}")
emit("artifact", uri=os.path.join(out, "artifact"), size=2, sha256="0" * 64, files=1)
emit("finished", artifact_uri=os.path.join(out, "artifact"), duration_seconds=0.1)
open(os.path.join(out, "argv.json"), "w").write(json.dumps(sys.argv[1:]))
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_TRAINER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


class FakeRuns:
    """The custom-objects calls the SDK makes to create a run, on a dict. ``reject``: the next creates fail with
    this error; ``lose_answer``: the next creates store the run, then the connection drops before the answer."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.reject: Exception | None = None
        self.lose_answer = False

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any]:
        self.calls.append(("get", name))
        if (namespace, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[(namespace, name)])

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if self.reject is not None:
            raise self.reject
        if (namespace, name) in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[(namespace, name)] = copy.deepcopy(body)
        if self.lose_answer:
            raise ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
        return copy.deepcopy(body)


@pytest.fixture
def api() -> FakeRuns:
    return FakeRuns()


@pytest.fixture
def bucket(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.fixture
def client(api: FakeRuns, bucket: LocalStore, monkeypatch: pytest.MonkeyPatch) -> Client:
    c = Client(namespace="team")
    monkeypatch.setattr(c, "_custom", lambda: api)
    monkeypatch.setattr(c, "store_for", lambda spec: bucket)
    return c
