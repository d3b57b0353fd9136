"""The CLI's argument handling and exit codes, and local mode's plumbing with a scripted fake trainer
(the real trainer runs in tests/unit/test_sdk_models.py and the e2e quickstart test)."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from kubetune.api import errors
from kubetune.sdk import local
from kubetune.sdk.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

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


runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


# ------------------------------------------------------------------------------------------------ local mode
def test_run_local_collects_events_logs_and_metrics(fake_python: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    seen: list[str] = []
    logs: list[str] = []
    result = local.run_local(QUICKSTART, python=fake_python, on_event=lambda e: seen.append(e.type),
                             on_log=logs.append)
    assert result.succeeded and result.name == "quickstart"
    assert result.output_dir == (tmp_path / "kubetune-runs" / "quickstart").resolve()
    assert seen[0] == "started" and seen[-1] == "finished" and seen.count("progress") == 4
    assert "step 1" in logs and any("loading train set" in line for line in logs)
    assert result.metrics() == {"before": {"R@1": 0.1, "R@5": 0.3, "mean_rank": 9.0},
                                "after": {"R@1": 0.6, "R@5": 0.9, "mean_rank": 2.0}}
    # the run directory: resolved run.yaml (absolute data paths), events.jsonl, trainer.log
    import yaml

    doc = yaml.safe_load((result.output_dir / "run.yaml").read_text())
    assert doc["spec"]["data"]["train"] == str(QUICKSTART.parent / "data" / "train.csv")
    assert doc["metadata"] == {"name": "quickstart", "namespace": "default"}
    assert len((result.output_dir / "events.jsonl").read_text().splitlines()) == len(seen)
    assert "step 4" in (result.output_dir / "trainer.log").read_text()
    argv = json.loads((result.output_dir / "argv.json").read_text())
    assert argv[:2] == ["-m", "kubetune_trainer"] and "--output-dir" in argv
    # a second run never overwrites the first
    again = local.run_local(QUICKSTART, python=fake_python)
    assert again.output_dir.name == "quickstart-2"


def test_run_local_failure_is_typed(fake_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    with pytest.raises(errors.LocalRunFailed) as info:
        local.run_local(QUICKSTART, output_dir=tmp_path / "r", python=fake_python)
    assert info.value.reason == "InvalidData" and "x.png" in str(info.value)
    assert info.value.trainer_exit_code == 65 and info.value.hint and "trainer.log" in info.value.hint
    monkeypatch.setenv("FAKE_MODE", "crash")
    with pytest.raises(errors.LocalRunFailed) as info:
        local.run_local(QUICKSTART, output_dir=tmp_path / "r2", python=fake_python)
    assert info.value.reason == "TrainerError" and "boom" in str(info.value)


def test_gpus_override_is_validated(fake_python: str, tmp_path: Path) -> None:
    result = local.run_local(QUICKSTART, output_dir=tmp_path / "g", python=fake_python, gpus=0)
    import yaml

    assert yaml.safe_load((result.output_dir / "run.yaml").read_text())["spec"]["resources"]["gpus"] == 0


def _fake_local(monkeypatch: pytest.MonkeyPatch, fake_python: str) -> None:
    monkeypatch.setattr(local, "run_local", functools.partial(local.run_local, python=fake_python))


def test_cli_run_local_shows_metrics_table_and_artifact(fake_python: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_local(monkeypatch, fake_python)
    out = invoke("run", "--local", str(QUICKSTART), "--output-dir", str(tmp_path / "run"))
    assert out.exit_code == 0, out.output
    assert "R@1" in out.output and "0.1000" in out.output and "0.6000" in out.output and "+0.5000" in out.output
    assert "mean_rank" in out.output and "-7.0000" in out.output
    assert str(tmp_path / "run" / "artifact") in out.output.replace("\n", "")


def test_cli_run_local_json(fake_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_local(monkeypatch, fake_python)
    out = runner.invoke(app, ["run", "--local", str(QUICKSTART), "--output-dir", str(tmp_path / "run"), "-o", "json"])
    assert out.exit_code == 0
    payload = json.loads(out.stdout)
    assert payload["name"] == "quickstart" and payload["metrics"]["after"]["R@1"] == 0.6
    assert payload["artifact"] == str(tmp_path / "run" / "artifact")


def test_cli_run_local_failure_exit_code(fake_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_local(monkeypatch, fake_python)
    monkeypatch.setenv("FAKE_MODE", "fail")
    out = invoke("run", "--local", str(QUICKSTART), "--output-dir", str(tmp_path / "run"))
    assert out.exit_code == errors.EXIT_RUN_FAILED
    assert "InvalidData" in out.output and "trainer.log" in out.output


# ------------------------------------------------------------------------------------------------ arguments
def test_help_lists_every_command() -> None:
    out = invoke("--help")
    for command in ("run", "submit", "list", "status", "logs", "cancel", "artifact", "encode", "report", "models"):
        assert command in out.output
    assert invoke("artifact", "--help").exit_code == 0
    assert "kubetune 0.1.0" in invoke("--version").output


def test_missing_run_file_is_usage_error(tmp_path: Path) -> None:
    out = runner.invoke(app, ["run", "--local", str(tmp_path / "absent.yaml")])
    assert out.exit_code == errors.EXIT_USAGE


def test_invalid_run_file_is_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  data: {train: data.csv}\n  training: {epochs: 0}\n")
    out = runner.invoke(app, ["run", "--local", str(bad)])
    assert out.exit_code == errors.EXIT_USAGE
    assert "spec.training.epochs" in out.output


def test_encode_needs_exactly_one_kind(tmp_path: Path) -> None:
    assert runner.invoke(app, ["encode", str(tmp_path)]).exit_code == errors.EXIT_USAGE
    assert runner.invoke(app, ["encode", str(tmp_path), "--text", "a", "--image", "b.png"]).exit_code == \
        errors.EXIT_USAGE


def test_encode_missing_artifact_exit_code(tmp_path: Path) -> None:
    out = runner.invoke(app, ["encode", str(tmp_path / "nope"), "--text", "a"])
    assert out.exit_code == errors.EXIT_ARTIFACT
    assert "no such artifact" in out.output


def test_artifact_verify(tmp_path: Path) -> None:
    from tests.unit.test_sdk import _fake_artifact

    _fake_artifact(tmp_path / "a")
    assert runner.invoke(app, ["artifact", "verify", str(tmp_path / "a")]).exit_code == 0
    (tmp_path / "a" / "metrics.json").write_text("changed")
    out = runner.invoke(app, ["artifact", "verify", str(tmp_path / "a")])
    assert out.exit_code == errors.EXIT_ARTIFACT and "metrics.json" in out.output


def test_models_table_and_json() -> None:
    out = invoke("models")
    assert out.exit_code == 0 and "ViT-B-32" in out.output and "laion2b_s34b_b79k" in out.output
    rows = json.loads(invoke("models", "-o", "json").stdout)
    assert {"name", "pretrained", "embed_dim", "description"} <= set(rows[0])
    import yaml

    assert yaml.safe_load(invoke("models", "-o", "yaml").stdout) == rows


def test_cluster_commands_without_a_cluster_exit_5(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    env = {"KUBECONFIG": str(kubeconfig)}
    for args in (["list"], ["status", "r"], ["logs", "r"], ["cancel", "r"]):
        out = runner.invoke(app, args, env=env)
        assert out.exit_code == errors.EXIT_UNAVAILABLE, (args, out.output)
        assert "cannot reach the Kubernetes API" in out.output
    out = runner.invoke(app, ["list"], env={"KUBECONFIG": str(tmp_path / "absent")})
    assert out.exit_code == errors.EXIT_UNAVAILABLE and "kubeconfig" in out.output


def test_namespace_comes_from_the_kubeconfig_context(tmp_path: Path) -> None:
    from kubetune.sdk.client import Client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "a",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)
    assert Client(kubeconfig=kubeconfig).namespace == "team-a"
    assert Client(kubeconfig=kubeconfig, context="b").namespace == "default"
    assert Client(kubeconfig=kubeconfig, namespace="x").namespace == "x"
