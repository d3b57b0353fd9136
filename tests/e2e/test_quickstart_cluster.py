"""The quickstart file, unchanged, on the harness cluster with the real trainer image, driven by the CLI only:
``kubetune submit`` (uploads the bundled data) → ``logs -f`` → ``status`` → ``artifact pull`` (sha256-verified)
→ ``encode`` → ``report NAME`` (downloads the artifact, reads the eval data back from S3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune.sdk.cli import app
from typer.testing import CliRunner

from tests.cluster.s3 import S3Server
from tests.integration.test_operator_support import OperatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_file_on_the_cluster_with_the_cli(e2e_cluster: Any, namespace: str,
                                                     trainer_operator: OperatorProcess, s3_server: S3Server,
                                                     s3_bucket: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    operator = trainer_operator
    env = {"KUBECONFIG": e2e_cluster.kubeconfig, "KUBETUNE_NAMESPACE": namespace, "COLUMNS": "150",
           "KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket,
           "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    out = runner.invoke(app, ["submit", str(ROOT / "examples" / "quickstart.yaml")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["logs", "quickstart", "-f"])
    assert out.exit_code == 0 and "artifact:" in out.output, out.output[-3000:]
    out = runner.invoke(app, ["status", "quickstart", "-o", "json"])
    status = json.loads(out.stdout)["status"]
    assert status["phase"] == "Succeeded", (status, operator.log())
    assert status["metrics"]["after"]["R@5"] > status["metrics"]["before"]["R@5"]

    model = tmp_path / "clip-model"
    out = runner.invoke(app, ["artifact", "pull", "quickstart", str(model)])
    assert out.exit_code == 0 and "verified" in out.output, out.output
    out = runner.invoke(app, ["encode", str(model), "--text", "a red circle on a white background", "-o", "json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["shape"] == [1, 64], out.output
    report = tmp_path / "report.html"
    out = runner.invoke(app, ["report", "quickstart", "--out", str(report)])
    assert out.exit_code == 0, out.output
    page = report.read_text()
    assert page.count('<div class="q"') == 6 and "ranks differently" not in page
