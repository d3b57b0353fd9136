"""Every code block of README.md and docs/*.md runs as written, or says where it runs instead.

A code block runs on this machine, in a scratch directory that has the repository's ``examples/`` and
``scripts/`` beside it and ``.venv/bin`` first on PATH (no cluster: ``KUBECONFIG`` unset), unless the HTML comment
on the line just above it says otherwise (``tests/docs_blocks.py`` lists the comments).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_blocks import BLOCKS, ROOT, Block

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_every_block_that_does_not_run_here_says_where_or_why() -> None:
    for block in BLOCKS:
        if block.annotation is None:
            continue
        if block.runs_in is not None:
            test, name = block.runs_in
            assert (ROOT / test).is_file(), f"{block.id}: {test} does not exist"
            assert f'block_named("{name}")' in (ROOT / test).read_text(), f"{block.id}: {test} does not run {name}"
        elif block.annotation.startswith("covered by "):
            target = ROOT / block.annotation.removeprefix("covered by ").strip()
            assert target.is_file(), f"{block.id}: {target} does not exist"
            first = next(line.strip() for line in block.code.splitlines() if line.strip())
            assert first in target.read_text(), f"{block.id}: {target.name} does not run {first!r}"
        else:
            assert re.match(r"not run: \S.{10,}", block.annotation), (
                f"{block.id}: unknown annotation {block.annotation!r} (runs in PATH as ID | covered by PATH | not run: "
                "REASON)")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.annotation is None], ids=lambda b: b.id)
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    for name in ("examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    script = tmp_path / ("example.py" if block.tag == "python" else "example.sh")
    script.write_text(block.code)
    command = [sys.executable, str(script)] if block.tag == "python" else ["bash", "-euo", "pipefail", str(script)]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, f"{block.id} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
