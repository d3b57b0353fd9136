"""The README's first command, exactly as written, in a fresh copy of the repository (so a fresh .venv):

    scripts/quickstart.sh

= ``scripts/install.sh sdk,trainer`` then ``.venv/bin/kubetune run --local examples/quickstart.yaml``. Then the
artifact it names loads and encodes with the freshly installed CLI, and fine-tuning improved retrieval.

The install takes minutes on a fresh machine (torch); pip's cache makes later runs faster. Set
``KUBETUNE_QUICKSTART_DIR`` to re-use a copy (and its .venv) between runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.docs_blocks import block_named, run_block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]
LOCAL_RUN_BUDGET_S = 180  # "under 3 minutes on a 2-core machine"


def fresh_copy(target: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored): no .venv, no kubetune-runs."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        source = ROOT / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    return target


def test_readme_first_command(tmp_path: Path) -> None:
    keep = os.environ.get("KUBETUNE_QUICKSTART_DIR")
    repo = Path(keep) if keep else tmp_path / "kubetune"
    if not (repo / "scripts" / "quickstart.sh").is_file():
        fresh_copy(repo)
    shutil.rmtree(repo / "kubetune-runs", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KUBECONFIG")}
    env["COLUMNS"] = "120"
    started = time.monotonic()
    out = subprocess.run(["scripts/quickstart.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=3300)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    text = out.stdout
    assert "Retrieval, before → after fine-tuning" in text and "R@1" in text, text[-3000:]
    match = re.search(r"done in (\d+):(\d{2}) · artifact: (\S+)", text)
    assert match, text[-2000:]
    local_seconds = int(match.group(1)) * 60 + int(match.group(2))
    print(f"quickstart: {elapsed:.0f}s in all, {local_seconds}s for `kubetune run --local`")
    # the budget is for an otherwise idle 2-core machine: a shared, busy one stretches the wall clock
    cores = os.cpu_count() or 1
    slowdown = max(1.0, os.getloadavg()[0] / cores, 2.0 / cores)
    assert local_seconds < LOCAL_RUN_BUDGET_S * slowdown, f"{local_seconds}s (load {os.getloadavg()})"
    artifact = Path(match.group(3))
    assert artifact == repo / "kubetune-runs" / "quickstart" / "artifact"

    kubetune = str(repo / ".venv" / "bin" / "kubetune")
    verify = subprocess.run([kubetune, "artifact", "verify", str(artifact)], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stderr
    encoded = subprocess.run([kubetune, "encode", str(artifact), "--text", "a red circle on a white background",
                              "--text", "a blue cross on a grey background", "-o", "json"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert encoded.returncode == 0, encoded.stderr
    payload = json.loads(encoded.stdout)
    assert payload["shape"] == [2, 64]
    image = repo / "examples" / "data" / "images" / "eval-00000.png"
    encoded = subprocess.run([kubetune, "encode", str(artifact), "--image", str(image), "-o", "json"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert encoded.returncode == 0 and json.loads(encoded.stdout)["shape"] == [1, 64], encoded.stderr

    # docs/sdk.md's next block, as written, in the same copy: encode with the artifact, then the report
    out = run_block(block_named("quickstart-artifact"), repo, env, timeout=600)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert (repo / "kubetune-runs" / "quickstart" / "report.html").is_file(), out.stdout[-2000:]

    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["after"]["R@5"] > metrics["before"]["R@5"] + 0.3
    assert metrics["after"]["reciprocal_rank"] > metrics["before"]["reciprocal_rank"]
