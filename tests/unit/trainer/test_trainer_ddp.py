"""DDP on CPU: the trainer's own launcher (``--nproc 2`` → torchrun, gloo) on the synthetic data.

Two real processes train the tiny model with DistributedDataParallel; only rank 0 may emit events or write
the artifact, and the loss must fall as it does in one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from kt_trainer_helpers import of_type, tiny_spec, write_run
from kubetune.api.events import MARKER, parse_line
from kubetune.storage import verify_manifest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[3]


def _run_ddp(root: Path, spec: dict[str, Any], extra_path: Path | None = None,
             extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    config = write_run(root / "run.yaml", spec)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    paths = [str(p) for p in (extra_path, REPO / "operator", REPO / "trainer-image") if p is not None]
    env.update(OMP_NUM_THREADS="1", KUBETUNE_PROGRESS_SECONDS="0",
               PYTHONPATH=os.pathsep.join([*paths, env.get("PYTHONPATH", "")]), **(extra_env or {}))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config),
                           "--output-dir", str(root / "out"), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=root)
    events = [e for e in (parse_line(line) for line in proc.stdout.splitlines()) if e is not None]
    return {"proc": proc, "events": events, "out": root / "out", "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def ddp_run(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # 256 pairs, 2 ranks × 32 per rank = 64 pairs per step: 4 steps per epoch, 24 steps in all
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 6, "learningRate": 2e-3})
    return _run_ddp(tmp_path_factory.mktemp("ddp"), spec)


def _tail(run: dict[str, Any]) -> str:
    return run["proc"].stdout[-2000:] + "\n--- stderr ---\n" + run["proc"].stderr[-4000:]


def test_two_processes_complete(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["proc"].returncode == 0, _tail(ddp_run)
    events = ddp_run["events"]
    assert events[0].type == "started" and events[-1].type == "finished"
    assert events[0].model_extra["world_size"] == 2
    assert events[0].total_steps == 6 * (256 // (32 * 2))
    progress = of_type(events, "progress")
    assert progress[-1].step == events[0].total_steps
    # samples per step count both ranks: 64 pairs per optimizer step
    metadata = json.loads((ddp_run["out"] / "artifact" / "metadata.json").read_text())
    assert metadata["training"]["world_size"] == 2 and metadata["training"]["steps"] == 24


def test_only_rank_0_emits_events_and_artifacts(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["proc"].returncode == 0, _tail(ddp_run)
    events = ddp_run["events"]
    lines = [line for line in ddp_run["proc"].stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == len(events)  # every event line parses: no interleaved writes of two ranks
    for kind, count in (("started", 1), ("finished", 1), ("artifact", 1), ("metrics", 6)):
        assert len(of_type(events, kind)) == count, kind
    assert [e.stage for e in of_type(events, "evaluation")] == ["before", "after"]
    steps = [e.step for e in of_type(events, "progress")]
    assert steps == sorted(set(steps))  # one progress event per step, not one per rank
    out: Path = ddp_run["out"]
    assert verify_manifest(out / "artifact") == []
    work = out / ".work"
    assert (work / "rank1").is_dir() and not (work / "rank1" / "artifact").exists()  # rank 1 wrote nothing
    assert not any(p.name == "manifest.json" for p in (work / "rank1").rglob("*"))


def test_loss_falls_under_ddp(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["proc"].returncode == 0, _tail(ddp_run)
    epochs = of_type(ddp_run["events"], "metrics")
    first, last = epochs[0].train_loss, epochs[-1].train_loss
    assert first is not None and last is not None
    # Under DDP each rank's ClipLoss scores its 32 rows against the 64 gathered features: uniform logits give
    # ln(64) ≈ 4.16, and the first epoch averages ≈4.5 (the initial logit scale). 24 steps of 64 pairs bring
    # the last epoch to ≈3.3; a broken all-reduce or gather leaves the replicas drifting apart and the loss at
    # or above chance. 0.5 below chance and a 20 % drop sit between the two.
    assert last < math.log(64) - 0.5
    assert last < 0.8 * first
    evaluations = {e.stage: e.metrics for e in of_type(ddp_run["events"], "evaluation")}
    assert evaluations["after"]["reciprocal_rank"] > evaluations["before"]["reciprocal_rank"]


# Loaded by every process of the run (first on PYTHONPATH): rank 0's retrieval evaluation takes SLOW_EVAL_SECONDS
# longer, as a large index would, while rank 1 has nothing to do but wait.
SLOW_EVALUATION = textwrap.dedent("""
    import os
    import time

    if os.environ.get("RANK") == "0":
        from kubetune_trainer import run

        _retrieval = run._Evaluator.retrieval

        def slow_retrieval(self, *args, **kwargs):
            time.sleep(float(os.environ["SLOW_EVAL_SECONDS"]))
            return _retrieval(self, *args, **kwargs)

        run._Evaluator.retrieval = slow_retrieval
""")


def test_a_rank_0_evaluation_longer_than_the_collective_timeout_keeps_the_run_alive(
        synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    # collectiveTimeoutSeconds 5: a step collective that waits longer fails the run; each of the two evaluations
    # (before, after) takes 12 s more on rank 0, which rank 1 spends waiting for it outside the step collectives
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_EVALUATION)
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 2, "learningRate": 2e-3, "collectiveTimeoutSeconds": 5})
    run = _run_ddp(tmp_path, spec, extra_path=hooks, extra_env={"SLOW_EVAL_SECONDS": "12"})
    assert run["proc"].returncode == 0, _tail(run)
    assert run["seconds"] > 24  # the slow evaluations did run
    assert [e.stage for e in of_type(run["events"], "evaluation")] == ["before", "after"]
    assert of_type(run["events"], "finished")
