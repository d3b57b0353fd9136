"""SIGTERM → checkpoint + exit 75; a restart resumes from that checkpoint's step, never from zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kt_trainer_helpers import of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_RETRYABLE, parse_line, parse_termination_message
from kubetune_trainer.sampling import EpochBatchSampler, epoch_batches

pytestmark = pytest.mark.unit


def test_sigterm_checkpoints_and_the_restart_resumes(tmp_path: Path, synthetic_data: dict[str, Path],
                                                     termination_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]), "valSplit": 0.125},
                     training={"epochs": 6}, runPolicy={"checkpointEverySteps": 3, "checkpointEveryEpochs": 1},
                     callbacks={"evaluation": {"enabled": False}})
    config = write_run(tmp_path / "run.yaml", spec)
    out = tmp_path / "out"
    argv = ["--config", str(config), "--output-dir", str(out)]
    env = {**os.environ, "KUBETUNE_PROGRESS_SECONDS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    first = []
    for line in proc.stdout:
        event = parse_line(line.rstrip("\n"))
        if event is None:
            continue
        first.append(event)
        if event.type == "checkpoint":
            proc.send_signal(signal.SIGTERM)
            break
    first.extend(e for e in (parse_line(line.rstrip("\n")) for line in proc.stdout) if e is not None)
    assert proc.wait(timeout=60) == EXIT_RETRYABLE
    (failed,) = of_type(first, "failed")
    assert failed.reason == "Preempted" and failed.retryable is True
    checkpoints = of_type(first, "checkpoint")
    saved_step = checkpoints[-1].step
    assert saved_step is not None and len(checkpoints) >= 2  # the periodic one and the one taken on SIGTERM
    total = of_type(first, "started")[0].total_steps
    assert total is not None and 0 < saved_step < total
    assert not of_type(first, "artifact")
    assert parse_termination_message(termination_log.read_text()) == [failed]  # written on the SIGTERM path too

    # the operator's next attempt names the last checkpoint it saw; the store has it
    monkeypatch.setenv("KUBETUNE_RESUME_FROM", str(checkpoints[-1].uri))
    code, second, raw = run_trainer(argv)
    assert code == 0, raw[-2000:]
    assert parse_termination_message(termination_log.read_text()) == of_type(second, "artifact") + second[-1:]
    started = of_type(second, "started")[0]
    assert started.model_extra["resumed_from_step"] == saved_step and started.step == saved_step
    steps = [e.step for e in of_type(second, "progress")]
    assert steps[0] == saved_step + 1 and steps[-1] == total  # continued, not restarted
    epochs_seen = [e.epoch for e in of_type(second, "metrics")]
    assert epochs_seen and epochs_seen[0] == saved_step // 7 + 1 and epochs_seen[-1] == 6  # 7 steps per epoch
    assert of_type(second, "artifact") and second[-1].type == "finished"

    # a third start finds the run finished: it re-announces the artifact and trains nothing
    code, third, _ = run_trainer(argv)
    assert code == 0 and [e.type for e in third] == ["artifact", "finished"]
    assert third[0].sha256 == of_type(second, "artifact")[0].sha256


def test_sampler_skips_exactly_the_trained_batches() -> None:
    full = epoch_batches(100, 8, seed=1, epoch=3)
    sampler = EpochBatchSampler(100, 8, seed=1)
    sampler.set_epoch(3, start_batch=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5 == 12 - 5
    assert epoch_batches(100, 8, seed=1, epoch=4) != full  # reshuffled every epoch
    ranks = [epoch_batches(100, 8, seed=1, epoch=3, rank=r, world_size=2) for r in range(2)]
    flat = [i for batches in ranks for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 2 * 6 * 8  # disjoint across ranks, last partial batch dropped
