"""docs/sdk.md's cluster blocks, as written, on the harness cluster with the real trainer image, then the CLI's
reading verbs on what they made:

- "The same file on a cluster": ``kubetune submit`` (uploads the bundled data) → ``logs -f`` → ``artifact pull``
  (sha256-verified); its ``export`` lines keep the harness's S3 endpoint and keys where they show placeholders;
- ``encode`` and ``report NAME`` (downloads the artifact, reads the eval data back from S3);
- the kubectl-habits block: ``submit --dry-run`` (server side), ``list -l``, ``wait --for``, ``describe``,
  ``logs --tail --since``, ``delete``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubetune.api import errors
from kubetune.sdk.cli import app
from kubetune.sdk.client import Client
from typer.testing import CliRunner

from tests.cluster.s3 import S3Server
from tests.docs_blocks import ROOT, block_named, run_block
from tests.integration.test_operator_support import OperatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def test_the_sdk_docs_cluster_blocks_run_as_written_on_the_cluster(e2e_cluster: Any, namespace: str,
                                                                   trainer_operator: OperatorProcess,
                                                                   s3_server: S3Server, s3_bucket: str,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    operator = trainer_operator
    harness = {"KUBECONFIG": e2e_cluster.kubeconfig, "KUBETUNE_NAMESPACE": namespace, "COLUMNS": "150",
               "KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket,
               "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    for key, value in harness.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}, **harness,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    out = run_block(block_named("cluster-quickstart"), tmp_path, env, keep_set_exports=True)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{operator.log()[-3000:]}"
    assert "artifact:" in out.stdout and "verified" in out.stdout, out.stdout[-3000:]
    client = Client(namespace=namespace, kubeconfig=e2e_cluster.kubeconfig)
    status = client.get_run("quickstart").status()
    assert status.phase == "Succeeded", (status, operator.log())
    assert status.metrics and status.metrics.after["R@5"] > status.metrics.before["R@5"]
    assert status.started_from is not None and status.started_from.source == "random init"
    model = tmp_path / "clip-model"
    assert (model / "manifest.json").is_file()

    runner = CliRunner()
    res = runner.invoke(app, ["encode", str(model), "--text", "a red circle on a white background", "-o", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["shape"] == [1, 64], res.output
    report = tmp_path / "report.html"
    res = runner.invoke(app, ["report", "quickstart", "--out", str(report)])
    assert res.exit_code == 0, res.output
    page = report.read_text()
    assert page.count('<div class="q"') == 6 and "ranks differently" not in page

    out = run_block(block_named("cluster-cli"), tmp_path, env)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    shown = out.stdout
    assert "finetunerun.kubetune.io/quickstart-2 created (server dry run" in shown, shown[-3000:]
    assert re.search(r"^\s*quickstart\s+Succeeded\s+kubetune-tiny\s", shown, re.M), shown  # list -l team=search
    assert (tmp_path / "model" / "manifest.json").read_bytes() == (model / "manifest.json").read_bytes()
    assert "Phase:" in shown and "Succeeded" in shown and "Started from:" in shown  # describe
    deadline = time.monotonic() + 60  # delete: the operator's finalizer lets it go
    while True:
        try:
            client.get_run("quickstart")
        except errors.RunNotFound:
            break
        assert time.monotonic() < deadline, "quickstart still exists 60 s after `kubetune delete`"
        time.sleep(0.5)
    with pytest.raises(errors.RunNotFound):
        client.get_run("quickstart-2")  # the dry run stored nothing
