"""The CLI's kubectl-shaped commands against the harness cluster: server-side dry runs (``validate --server``,
``submit --dry-run``) need only the CRD; ``list -l`` / ``-o name|wide``; and with the operator and the stand-in
trainer image, ``wait``, ``describe`` (conditions and the run's Events), ``logs --tail/--since/--previous`` and
``delete``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import errors
from kubetune.sdk.cli import RESOURCE, app
from typer.testing import CliRunner

from tests.integration.test_operator_support import (
    Runs,
    crd_installed,
    operator,
    run_manifest,
    runs,
    standin,
    standin_image,
)

__all__ = ["crd_installed", "operator", "runs", "standin_image"]

pytestmark = pytest.mark.integration
runner = CliRunner()


def cli(cluster: Any, namespace: str, *args: str) -> Any:
    return runner.invoke(app, list(args), env={"KUBECONFIG": cluster.kubeconfig, "KUBETUNE_NAMESPACE": namespace,
                                               "COLUMNS": "200"})


def run_file(tmp_path: Path, name: str) -> Path:
    """A run file whose data is remote, so that nothing needs uploading."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run_manifest(name, model={"name": "ViT-B-32"})))
    return path


def test_server_dry_runs_store_nothing(crd_installed: str, cluster: Any, namespace: str, runs: Runs,
                                       tmp_path: Path) -> None:
    path = run_file(tmp_path, "dry")
    out = cli(cluster, namespace, "validate", "--server", str(path))
    assert out.exit_code == 0 and f"{RESOURCE}/dry valid (server dry run" in out.stdout, out.output
    out = cli(cluster, namespace, "submit", "--dry-run", str(path), "-o", "json")
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert obj["metadata"]["name"] == "dry" and obj["metadata"]["namespace"] == namespace
    assert obj["spec"]["training"]["epochs"] == 5  # the API server applied the CRD's defaults
    assert cli(cluster, namespace, "submit", "--dry-run", str(path), "-o", "name").stdout == f"{RESOURCE}/dry\n"
    assert runs.get("dry") is None
    runs.create(run_manifest("dry"))
    out = cli(cluster, namespace, "submit", "--dry-run", str(path))
    assert out.exit_code == errors.EXIT_USAGE and "already exists" in out.stderr


def test_list_selector_and_output_formats(crd_installed: str, cluster: Any, namespace: str, runs: Runs) -> None:
    for name, team in (("a-run", "a"), ("b-run", "b")):
        manifest = run_manifest(name)
        manifest["metadata"]["labels"] = {"team": team}
        runs.create(manifest)
    out = cli(cluster, namespace, "list", "-o", "name")
    assert out.stdout.splitlines() == [f"{RESOURCE}/a-run", f"{RESOURCE}/b-run"]
    out = cli(cluster, namespace, "list", "-l", "team=b", "-o", "name")
    assert out.stdout.splitlines() == [f"{RESOURCE}/b-run"]
    assert [r["name"] for r in json.loads(cli(cluster, namespace, "list", "-l", "team!=b", "-o", "json").stdout)] == [
        "a-run"]
    out = cli(cluster, namespace, "list", "-o", "wide")
    assert out.exit_code == 0 and "ATTEMPTS" in out.stdout and "ARTIFACT" in out.stdout
    out = cli(cluster, namespace, "list", "-l", "team=nobody")
    assert out.exit_code == 0 and "no runs found matching team=nobody" in out.stderr
    assert cli(cluster, namespace, "status", "a-run", "-o", "name").stdout == f"{RESOURCE}/a-run\n"
    out = cli(cluster, namespace, "delete", "a-run", "absent")
    assert out.exit_code == errors.EXIT_NOT_FOUND and f"{RESOURCE}/a-run deleted" in out.stdout
    assert "absent not found" in out.stderr
    assert cli(cluster, namespace, "wait", "a-run", "--for=delete", "--timeout=30s").exit_code == 0


def test_wait_describe_logs_and_delete(standin_image: str, operator: Any, cluster: Any, namespace: str,
                                       runs: Runs) -> None:
    runs.create(run_manifest("w", model=standin(steps=30, pace=0.3)))
    out = cli(cluster, namespace, "wait", "w", "--for=phase=Running", "--timeout=90s", "--interval=0.5")
    assert out.exit_code == 0 and f"{RESOURCE}/w phase=Running met" in out.stdout, out.output
    out = cli(cluster, namespace, "wait", "w", "--timeout=0")
    assert out.exit_code == errors.EXIT_NOT_FINISHED and "timed out" in out.stderr
    out = cli(cluster, namespace, "wait", "w", "--timeout=120s", "--interval=0.5")
    assert out.exit_code == 0 and "condition=Succeeded met" in out.stdout, out.output

    out = cli(cluster, namespace, "logs", "w", "--tail", "3")
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "stand-in trainer: done", out.stdout
    assert not any(line.startswith("KUBETUNE_EVENT") for line in lines)
    everything = cli(cluster, namespace, "logs", "w").stdout.splitlines()
    assert cli(cluster, namespace, "logs", "w", "--since", "1h").stdout.splitlines() == everything
    assert len(everything) > 3
    out = cli(cluster, namespace, "logs", "w", "--previous")
    assert out.exit_code == errors.EXIT_NOT_FOUND and "no previous attempt" in out.stderr

    out = cli(cluster, namespace, "describe", "w")
    assert out.exit_code == 0, out.output
    assert "Succeeded" in out.stdout and "Conditions:" in out.stdout and "Events:" in out.stdout
    assert "JobCreated" in out.stdout
    described = json.loads(cli(cluster, namespace, "describe", "w", "-o", "json").stdout)
    assert described["status"]["phase"] == "Succeeded"
    assert "JobCreated" in [e["reason"] for e in described["events"]]
    assert all(e["involvedObject"]["name"] == "w" for e in described["events"])

    out = cli(cluster, namespace, "delete", "w")
    assert out.exit_code == 0 and out.stdout == f"{RESOURCE}/w deleted\n"
    assert cli(cluster, namespace, "wait", "w", "--for=delete", "--timeout=30s").exit_code == 0


def test_wait_on_a_failed_run_exits_1_and_logs_previous_reads_the_attempt_before(
        standin_image: str, operator: Any, cluster: Any, namespace: str, runs: Runs) -> None:
    runs.create(run_manifest("bad", model=standin(steps=3, pace=0.1, exit_code=78)))
    out = cli(cluster, namespace, "wait", "bad", "--timeout=90s", "--interval=0.5")
    assert out.exit_code == errors.EXIT_RUN_FAILED and "run bad failed" in out.stderr, out.output
    assert cli(cluster, namespace, "wait", "bad", "--for=condition=Failed", "--timeout=5s").exit_code == 0

    runs.create(run_manifest("retry", model=standin(steps=6, pace=0.2, exit_code=75, fail_attempts=1,
                                                    fail_at_step=4), training={"epochs": 2}))
    assert cli(cluster, namespace, "wait", "retry", "--timeout=120s", "--interval=0.5").exit_code == 0
    previous = cli(cluster, namespace, "logs", "retry", "--previous")
    assert previous.exit_code == 0, previous.output
    latest = cli(cluster, namespace, "logs", "retry").stdout
    assert previous.stdout != latest and latest.rstrip().endswith("stand-in trainer: done")
