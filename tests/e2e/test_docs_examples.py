"""Every code block of README.md and docs/*.md runs as written, or says where it runs instead.

A fenced block tagged ``python``, ``sh`` or ``bash`` is code; other tags (``text``, ``yaml``, ``console`` output,
none) are shown text. A code block runs on this machine, in a scratch directory that has the repository's
``examples/`` and ``scripts/`` beside it and ``.venv/bin`` first on PATH (no cluster: ``KUBECONFIG`` unset),
unless the HTML comment on the line just above it says otherwise:

- ``<!-- example: covered by tests/e2e/test_x.py -->``: another test runs it (against the harness cluster,
  or because it installs); the named file must exist and contain the block's first line;
- ``<!-- example: not run: REASON -->``: it cannot run in a test (REASON says why, e.g. it names a user's
  own cluster).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_TAGS = {"python": "python", "sh": "sh", "bash": "sh"}
FENCE = re.compile(r"^```(\S*)\s*$")
ANNOTATION = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    tag: str
    code: str
    annotation: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        tag = opening.group(1)
        if tag in CODE_TAGS:
            above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            note = ANNOTATION.match(above)
            blocks.append(Block(path, i + 1, CODE_TAGS[tag], "\n".join(lines[i + 1:end]) + "\n",
                                note.group(1) if note else None))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in code_blocks(path)]


def test_every_block_that_does_not_run_here_says_where_or_why() -> None:
    for block in BLOCKS:
        if block.annotation is None:
            continue
        if block.annotation.startswith("covered by "):
            target = ROOT / block.annotation.removeprefix("covered by ").strip()
            assert target.is_file(), f"{block.id}: {target} does not exist"
            first = next(line.strip() for line in block.code.splitlines() if line.strip())
            assert first in target.read_text(), f"{block.id}: {target.name} does not run {first!r}"
        else:
            assert re.match(r"not run: \S.{10,}", block.annotation), (
                f"{block.id}: unknown annotation {block.annotation!r} (covered by PATH | not run: REASON)")


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
