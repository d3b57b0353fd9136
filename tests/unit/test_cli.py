"""The CLI's argument handling and exit codes, its offline commands (explain, validate, models), the pure parts
of its cluster commands (wait's conditions, durations, describe's page), and local mode's plumbing with a scripted
fake trainer (``fake_python`` in conftest.py; the real trainer runs in tests/unit/test_sdk_models.py and the e2e
quickstart test). No traceback for bad input: tests/unit/test_cli_errors.py. Against a cluster:
tests/integration/test_cli_cluster.py."""

from __future__ import annotations

import functools
import json
import os
import sys
import types
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
    assert doc["metadata"] == {"name": "quickstart", "namespace": "default", "labels": {"team": "search"}}
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
    for command in ("run", "submit", "validate", "explain", "list", "status", "describe", "delete", "wait", "logs",
                    "cancel", "artifact", "encode", "report", "models"):
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
    assert {"name", "pretrained", "default", "embed_dim", "description"} <= set(rows[0])
    defaults = {row["name"]: row["pretrained"] for row in rows if row["default"]}
    assert defaults["ViT-B-32"] == "laion2b_s34b_b79k" and "the tag a model name alone starts from" in out.output
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


# ------------------------------------------------------------------------------------------------ kubectl habits
def test_no_arguments_print_help_and_exit_0() -> None:
    from kubetune.sdk.cli import main

    out = runner.invoke(app, [])
    assert out.exit_code == 0 and "Usage: kubetune" in out.stdout and "describe" in out.stdout
    assert runner.invoke(app, ["artifact"]).exit_code == 0
    assert main(["--version"]) == 0 and main(["lsit"]) == errors.EXIT_USAGE


def test_usage_errors_are_an_error_line_and_a_hint() -> None:
    out = runner.invoke(app, ["list", "--selectr", "team=a"])
    assert out.exit_code == errors.EXIT_USAGE
    assert out.stderr.splitlines() == ["error: no such option: --selectr",
                                       "hint: did you mean --selector? (`kubetune list --help` lists the arguments "
                                       "and options)"]
    out = runner.invoke(app, ["lsit"])
    assert out.stderr.splitlines() == ["error: no such command 'lsit'", "hint: did you mean list or submit?"]
    out = runner.invoke(app, ["status"])
    assert out.exit_code == errors.EXIT_USAGE and out.stderr.startswith("error: missing argument")
    out = runner.invoke(app, ["list", "-o", "xml"])
    assert out.exit_code == errors.EXIT_USAGE and "'xml' is not one of" in out.stderr


def test_shell_completion_is_enabled() -> None:
    out = runner.invoke(app, ["--show-completion", "bash"])
    assert out.exit_code == 0 and "complete -o default -F _kubetune_completion kubetune" in out.stdout
    complete = {"_KUBETUNE_COMPLETE": "complete_bash", "COMP_WORDS": "kubetune de", "COMP_CWORD": "1"}
    assert runner.invoke(app, [], env=complete).stdout.split() == ["describe", "delete"]
    complete = {"_KUBETUNE_COMPLETE": "complete_bash", "COMP_WORDS": "kubetune logs run --t", "COMP_CWORD": "3"}
    assert runner.invoke(app, [], env=complete).stdout.split() == ["--tail"]


def test_explain_a_field_offline() -> None:
    out = invoke("explain", "spec.training.learningRate")
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert lines[:4] == ["FIELD:       spec.training.learningRate", "TYPE:        number", "DEFAULT:     1e-05",
                         "BOUNDS:      > 0.0; ≤ 1.0"]
    assert "Peak learning rate." in out.stdout
    # snake_case, without spec., with kubectl's resource prefix: the same field
    for spelling in ("training.learning_rate", "finetunerun.spec.training.learningRate",
                     "ftr.spec.training.LEARNINGRATE"):
        assert invoke("explain", spelling).stdout == out.stdout
    enum = invoke("explain", "spec.training.optimizer").stdout
    assert "VALUES:      adamw, adam, sgd" in enum and 'DEFAULT:     "adamw"' in enum
    section = invoke("explain", "spec.training").stdout
    assert "FIELDS:" in section and "epochs <integer>" in section
    assert "effect <string>" in invoke("explain", "spec.resources.tolerations").stdout  # an array's items
    assert "\n        batchSize <integer>" in invoke("explain", "spec", "--recursive").stdout
    assert "TYPE:        string" in invoke("explain", "status.phase").stdout
    payload = json.loads(invoke("explain", "spec.data.train", "-o", "json").stdout)
    assert payload["field"] == "spec.data.train" and payload["required"] is True
    assert payload["schema"]["minLength"] == 1


def test_explain_an_unknown_field_names_the_nearest() -> None:
    out = runner.invoke(app, ["explain", "spec.training.learningrat"])
    assert out.exit_code == errors.EXIT_USAGE
    assert out.stderr.splitlines() == ["error: unknown field spec.training.learningrat",
                                       "hint: did you mean spec.training.learningRate?"]
    out = runner.invoke(app, ["explain", "spec.learningRate"])  # at the wrong level
    assert "did you mean spec.training.learningRate?" in out.stderr
    out = runner.invoke(app, ["explain", "spec.training.zzz"])
    assert "the fields of spec.training: epochs, batchSize, learningRate" in out.stderr


def test_validate_offline_and_print_the_defaults(tmp_path: Path) -> None:
    out = invoke("validate", str(QUICKSTART))
    assert out.exit_code == 0 and "valid" in out.stdout and "quickstart" in out.stdout
    import yaml

    doc = yaml.safe_load(invoke("validate", str(QUICKSTART), "-o", "yaml").stdout)
    assert doc["kind"] == "FinetuneRun" and doc["metadata"]["name"] == "quickstart"
    assert doc["spec"]["training"]["optimizer"] == "adamw" and doc["spec"]["runPolicy"]["backoffLimit"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  data: {train: s3://b/t.csv}\n  training: {epochs: 0}\n")
    out = runner.invoke(app, ["validate", str(bad)])
    assert out.exit_code == errors.EXIT_USAGE and "spec.training.epochs" in out.stderr
    bad.write_text("spec:\n  data: {train: nowhere.csv}\n")
    out = runner.invoke(app, ["validate", str(bad)])
    assert out.exit_code == errors.EXIT_USAGE and "spec.data.train" in out.stderr and "does not exist" in out.stderr
    bad.write_text("spec:\n  data: [train\n")
    out = runner.invoke(app, ["validate", str(bad)])
    assert out.stderr.splitlines()[0].startswith(f"error: {bad}: not valid YAML at line 3, column 1")


def test_run_files_are_checked_before_any_cluster_is_asked(tmp_path: Path) -> None:
    """A bad run file is exit 2 even with no cluster at all (exit 5 would mean the cluster was tried first)."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(bytes(range(256)))
    env = {"KUBECONFIG": str(tmp_path / "absent")}
    for args in (["submit", str(bad)], ["submit", "--dry-run", str(bad)], ["run", str(bad)],
                 ["validate", "--server", str(bad)]):
        out = runner.invoke(app, args, env=env)
        assert out.exit_code == errors.EXIT_USAGE and "not a text file" in out.stderr, args
    out = runner.invoke(app, ["validate", "--server", str(QUICKSTART)], env=env)
    assert out.exit_code == errors.EXIT_UNAVAILABLE and "kubeconfig" in out.stderr


@pytest.mark.parametrize(("text", "seconds"), [("30", 30), ("30s", 30), ("10m", 600), ("1h30m", 5400), ("2d", 172800),
                                               ("500ms", 0.5), ("0", 0), ("1.5h", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    from kubetune.sdk.cli import parse_duration

    assert parse_duration(text, "--since") == seconds


@pytest.mark.parametrize("text", ["", "10x", "m", "-1s", "1h 30m", "nan", "inf", "10m5"])
def test_parse_duration_refuses(text: str) -> None:
    from kubetune.sdk.cli import parse_duration

    with pytest.raises(errors.ConfigInvalid, match="not a duration"):
        parse_duration(text, "--since")


def _status(phase: str | None, *conditions: tuple[str, str]) -> Any:
    from kubetune.api.spec import FinetuneRunStatus

    return FinetuneRunStatus.model_validate({"phase": phase, "conditions": [
        {"type": t, "status": s, "reason": "Because"} for t, s in conditions]})


@pytest.mark.parametrize(("target", "status", "outcome"), [
    ("condition=Succeeded", _status("Running", ("Running", "True")), "pending"),
    ("condition=Succeeded", _status("Succeeded", ("Succeeded", "True")), "met"),
    ("condition=succeeded", _status("Succeeded", ("Succeeded", "True")), "met"),
    ("condition=Succeeded", _status("Failed", ("Failed", "True")), "failed"),
    ("condition=Succeeded", _status("Cancelled", ("Cancelled", "True")), "failed"),
    ("condition=Failed", _status("Failed", ("Failed", "True")), "met"),
    ("condition=Failed", _status("Succeeded", ("Succeeded", "True")), "never"),
    ("condition=Running=False", _status("Succeeded", ("Running", "False")), "met"),
    ("condition=CleanedUp", _status("Succeeded", ("Succeeded", "True")), "pending"),  # comes after the end
    ("phase=Running", _status("Pending"), "pending"),
    ("phase=Pending", _status(None), "met"),
    ("phase=running", _status("Running", ("Running", "True")), "met"),
    ("phase=Running", _status("Succeeded", ("Succeeded", "True")), "never"),
    ("phase=Running", _status("Failed", ("Failed", "True")), "failed"),
])
def test_wait_outcome(target: str, status: Any, outcome: str) -> None:
    from kubetune.sdk.cli import parse_wait_for, wait_outcome

    assert wait_outcome(parse_wait_for(target), status) == outcome


def test_wait_for_refuses_what_cannot_be_waited_for() -> None:
    from kubetune.sdk.cli import WaitFor, parse_wait_for

    assert parse_wait_for("delete") == WaitFor("delete")
    assert str(parse_wait_for("condition=Running=false")) == "condition=Running=False"
    for text, match in (("phase=Done", "no such phase"), ("condition=", "not something"), ("ready", "not something"),
                        ("condition=Ready=maybe", "not something"), ("delete=now", "not something")):
        with pytest.raises(errors.ConfigInvalid, match=match):
            parse_wait_for(text)
    out = runner.invoke(app, ["wait", "r", "--for", "phase=Done"], env={"KUBECONFIG": "/absent"})
    assert out.exit_code == errors.EXIT_USAGE and "Pending, Running, Succeeded" in out.stderr


def test_logs_flags_are_checked_before_any_cluster_is_asked() -> None:
    env = {"KUBECONFIG": "/absent"}
    out = runner.invoke(app, ["logs", "r", "-f", "--tail", "5"], env=env)
    assert out.exit_code == errors.EXIT_USAGE and "--follow" in out.stderr
    out = runner.invoke(app, ["logs", "r", "--since", "5y"], env=env)
    assert out.exit_code == errors.EXIT_USAGE and "not a duration" in out.stderr
    assert runner.invoke(app, ["logs", "r", "--tail", "-2"], env=env).exit_code == errors.EXIT_USAGE
    assert runner.invoke(app, ["logs", "r", "--tail", "-1", "--since", "10m"], env=env).exit_code == \
        errors.EXIT_UNAVAILABLE


def test_describe_page_shows_spec_conditions_and_events() -> None:
    from datetime import datetime, timezone

    from kubetune.sdk.cli import describe_view
    from rich.console import Console

    obj = {"metadata": {"name": "shoes", "namespace": "team", "creationTimestamp": "2026-01-01T10:00:00Z",
                        "labels": {"team": "search"}},
           "spec": {"model": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
                    "data": {"train": "s3://d/train.csv", "eval": "s3://d/eval.csv"}, "training": {"epochs": 3}},
           "status": {"phase": "Failed", "message": "row 3: [image] x.png not found", "attempts": 2,
                      "conditions": [{"type": "Running", "status": "False", "reason": "InvalidData",
                                      "lastTransitionTime": "2026-01-01T10:04:00Z"},
                                     {"type": "Failed", "status": "True", "reason": "InvalidData",
                                      "message": "row 3: [image] x.png not found",
                                      "lastTransitionTime": "2026-01-01T10:04:00Z"}]}}
    events = [{"type": "Normal", "reason": "JobCreated", "message": "Job shoes-1 created", "count": 1,
               "lastTimestamp": "2026-01-01T10:00:01Z", "source": {"component": "kopf"}},
              {"type": "Warning", "reason": "Failed", "message": "InvalidData: row 3", "count": 2,
               "lastTimestamp": "2026-01-01T10:04:00Z", "reportingComponent": "kubetune"}]
    console = Console(record=True, width=160)
    console.print(describe_view(obj, events, now=datetime(2026, 1, 1, 10, 5, tzinfo=timezone.utc)))
    page = console.export_text()
    assert "Name:" in page and "shoes" in page and "team=search" in page and "(5m ago)" in page
    assert "ViT-B-32::laion2b_s34b_b79k" in page and "3 epochs · batch 64" in page and "train s3://d/train.csv" in page
    assert "row 3: [image] x.png not found" in page  # markup-like text shown as written
    conditions = page[page.index("Conditions:"):page.index("Events:")]
    assert "Failed" in conditions and "True" in conditions and "InvalidData" in conditions and "1m" in conditions
    events_part = page[page.index("Events:"):]
    assert "JobCreated" in events_part and "4m" in events_part and "kopf" in events_part
    assert "1m (x2)" in events_part and "kubetune" in events_part
    console = Console(record=True, width=160)
    console.print(describe_view({"metadata": {"name": "new"}, "spec": {"data": {"train": "x.csv"}}}, []))
    page = console.export_text()
    assert "Conditions:  <none>" in page and "Events:  <none>" in page


def test_models_name_output() -> None:
    names = invoke("models", "-o", "name").stdout.splitlines()
    assert "ViT-B-32::laion2b_s34b_b79k" in names and all("::" in n for n in names)


def test_models_stage_checks_its_arguments_then_needs_the_staging_module(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.sdk.cli import STAGING_MODULE

    for args, words in ((["ViT-B-32", "s3://models/vit"], "expected NAME::TAG"),
                        (["ViT-B-32::openai", "models/vit"], "not an s3://BUCKET/PREFIX URI"),
                        (["ViT-B-32::openai", "s3://models/vit", "--from", str(tmp_path / "absent.pt")],
                         "no such file")):
        out = runner.invoke(app, ["models", "stage", *args])
        assert out.exit_code == errors.EXIT_USAGE and words in out.stderr, args
    monkeypatch.setitem(sys.modules, STAGING_MODULE, None)  # the module cannot be imported
    out = runner.invoke(app, ["models", "stage", "ViT-B-32::openai", "s3://models/vit"])
    assert out.exit_code == errors.EXIT_MISSING_EXTRA and STAGING_MODULE in out.stderr and "hint: pip install" in \
        out.stderr
    calls: list[tuple[Any, ...]] = []
    staging = types.ModuleType(STAGING_MODULE)
    def stage_model(ref: str, dest: str, source: str | None = None) -> dict[str, Any]:
        calls.append((ref, dest, source))
        uri = f"{dest}/ViT-B-32/openai"  # what kubetune.sdk.staging.stage_model returns
        return {"ref": ref, "name": "ViT-B-32", "pretrained": "openai", "uri": uri, "file": f"{uri}/w.pt",
                "sha256": "ab" * 32, "size": 1_500_000, "source": source}

    staging.stage_model = stage_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, STAGING_MODULE, staging)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"w")
    out = runner.invoke(app, ["models", "stage", "ViT-B-32::openai", "s3://models/vit", "--from", str(weights)])
    assert out.exit_code == 0, out.output
    assert calls == [("ViT-B-32::openai", "s3://models/vit", str(weights))]
    assert " ".join(out.stdout.split()) == (
        "staged ViT-B-32::openai → s3://models/vit/ViT-B-32/openai/w.pt (1.5 MB, sha256 abababababab); a run's "
        "trainer reads it with runDefaults.models.mirror = s3://models/vit")
    out = runner.invoke(app, ["models", "stage", "ViT-B-32::openai", "s3://models/vit", "-o", "json"])
    assert json.loads(out.stdout)["file"] == "s3://models/vit/ViT-B-32/openai/w.pt"


def test_only_a_failed_run_exits_1() -> None:
    from kubetune.sdk.cli import exit_code_of

    assert exit_code_of(errors.RunFailed("r", "Failed", "OOMKilled", None)) == errors.EXIT_RUN_FAILED
    assert exit_code_of(errors.KubetuneError("get finetunerun r: API error 500: boom")) == errors.EXIT_UNAVAILABLE
    assert exit_code_of(errors.RunNotFound("r", "ns")) == errors.EXIT_NOT_FOUND
