"""The code blocks of README.md and docs/*.md, for the tests that run them as written.

A fenced block tagged ``python``, ``sh`` or ``bash`` is code; other tags (``text``, ``yaml``, ``console`` output,
none) are shown text. The HTML comment on the line just above a code block says where it runs:

- none: ``tests/e2e/test_docs_examples.py`` runs it on this machine (no cluster);
- ``<!-- example: runs in tests/e2e/test_x.py as ID -->``: that test takes the block by its ID
  (:func:`block_named`) and runs it as written where it needs to (the harness cluster, after a quickstart);
- ``<!-- example: covered by tests/e2e/test_x.py -->``: that test runs the same commands (e.g. it installs);
- ``<!-- example: not run: REASON -->``: it cannot run in a test (REASON says why).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_TAGS = {"python": "python", "sh": "sh", "bash": "sh"}
FENCE = re.compile(r"^```(\S*)\s*$")
ANNOTATION = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
RUNS_IN = re.compile(r"^runs in (\S+) as (\S+)$")

# Bash's `export` for docs that show placeholders (`export AWS_ACCESS_KEY_ID=...`): a variable the test has set
# keeps the test's value (the harness's S3 endpoint and keys), any other is exported as written.
KEEP_SET_EXPORTS = """export() {
  local pair key
  for pair in "$@"; do
    key=${pair%%=*}
    if [[ -z ${!key+set} ]]; then builtin export "$pair"; fi
  done
}
"""


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

    @property
    def runs_in(self) -> tuple[str, str] | None:
        """(test file, block ID) of a block another test runs as written."""
        found = RUNS_IN.match(self.annotation or "")
        return (found.group(1), found.group(2)) if found else None


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


def block_named(name: str) -> Block:
    """The one block annotated ``runs in ... as NAME``."""
    (block,) = [b for b in BLOCKS if b.runs_in is not None and b.runs_in[1] == name]
    return block


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = 800,
              keep_set_exports: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a shell block as written (``bash -euo pipefail``) in ``cwd`` with exactly ``env``."""
    assert block.tag == "sh", f"{block.id} is not a shell block"
    script = cwd / f"doc-block-{block.line}.sh"
    script.write_text((KEEP_SET_EXPORTS if keep_set_exports else "") + block.code)
    try:
        return subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        script.unlink()
