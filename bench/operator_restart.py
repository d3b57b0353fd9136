"""Operator restart under load, side by side: the current operator against a reference revision.

    python -m bench.operator_restart --reference 2b39e01 --runs 40 --repeats 3 [--json out.json]

Each repeat is one ``bench.operator_scale`` run with ``--restart-after``: N stand-in runs are created, the operator
is SIGKILLed while they train and started again. The reference side runs the same bench, the same stand-in image
and the same cluster, with only the operator's package taken from ``git worktree`` of the reference revision
(``PYTHONPATH`` puts it before the installed one). Sides alternate (reference, current, reference, …) so that
drift in the machine's load hits both. Reported per side: median, min and max of the status regressions (runs
whose ``progress.step`` went down for the same pod), the busiest second of status writes after and before the
restart, and the event → status lag p99; the 1-minute load average before each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("status_regressions", "status_writes_per_s_max_after_restart", "status_writes_per_s_max_before_restart",
           "operator_patches_per_s_max_after_restart", "operator_patches_per_s_mean_after_restart",
           "event_to_status_p99_s", "duplicate_jobs", "finished")


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each figure over the repeats of one side."""
    out: dict[str, Any] = {}
    for name in FIGURES:
        values = [r[name] for r in repeats if isinstance(r.get(name), (int, float))]
        if values:
            out[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def one_repeat(pythonpath: str | None, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench.operator_scale", "--runs", str(args.runs), "--steps", str(args.steps),
               "--pace", str(args.pace), "--restart-after", str(args.restart_after), "--json", out.name]
        subprocess.run(cmd, cwd=str(ROOT), env=env, check=True, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="git revision of the reference operator")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--pace", type=float, default=1.0)
    p.add_argument("--restart-after", type=float, default=40.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    worktree = Path(tempfile.mkdtemp(prefix="kubetune-reference-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.reference], cwd=str(ROOT), check=True,
                   capture_output=True)
    sides: dict[str, list[dict[str, Any]]] = {"reference": [], "current": []}
    try:
        for i in range(args.repeats):
            for side, path in (("reference", str(worktree / "operator")), ("current", None)):
                load = os.getloadavg()[0]
                result = one_repeat(path, args)
                result["load_1m_before"] = round(load, 2)
                sides[side].append(result)
                print(json.dumps({"side": side, "repeat": i + 1,
                                  **{k: result.get(k) for k in (*FIGURES, "load_1m_before")}}), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=str(ROOT), check=False,
                       capture_output=True)
    report = {"reference": args.reference, "runs": args.runs, "steps": args.steps, "pace_s": args.pace,
              "restart_after_s": args.restart_after, "repeats": args.repeats, "cpus": os.cpu_count(),
              "summary": {side: summarize(results) for side, results in sides.items()}, "raw": sides}
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
