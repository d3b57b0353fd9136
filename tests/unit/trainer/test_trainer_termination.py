"""The real trainer's termination message and its ``KUBETUNE_*`` contract (:mod:`kubetune.api.trainer_env`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kt_trainer_helpers import of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import TERMINATION_MESSAGE_MAX_BYTES, TERMINATION_METRICS, parse_termination_message

pytestmark = pytest.mark.unit


def _message(path: Path) -> tuple[str, list]:
    text = path.read_text()
    assert 0 < len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    return text, parse_termination_message(text)


def test_a_finished_run_leaves_its_result_in_the_termination_log(tmp_path: Path, synthetic_data: dict[str, Path],
                                                                 termination_log: Path) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 1, "maxSteps": 2})
    code, events, raw = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == 0, raw[-3000:]
    text, summary = _message(termination_log)
    assert [e.type for e in summary] == ["evaluation", "artifact", "finished"]
    evaluation, artifact, finished = summary
    assert artifact == of_type(events, "artifact")[-1]  # the very events of the log
    assert finished == of_type(events, "finished")[-1]
    assert artifact.uri and artifact.sha256 and artifact.size and artifact.model_extra["files"]
    after = next(e for e in events if e.type == "evaluation" and e.stage == "after")
    assert after.metrics and evaluation.metrics
    assert evaluation.metrics == {k: v for k, v in after.metrics.items() if k in TERMINATION_METRICS or "loss" in k}
    assert set(TERMINATION_METRICS) <= set(evaluation.metrics)
    lines = text.split("\n")
    assert lines[1] in raw.splitlines() and lines[2] in raw.splitlines()  # byte for byte the lines of stdout


def test_a_bad_config_leaves_a_failed_event(tmp_path: Path, termination_log: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("spec: {training: {batchSize: -1}}")
    code, events, _ = run_trainer(["--config", str(bad), "--output-dir", str(tmp_path / "out")])
    assert code == 78
    _, summary = _message(termination_log)
    assert summary == of_type(events, "failed")
    assert summary[0].reason == "InvalidConfig" and summary[0].retryable is False
    assert summary[0].model_extra["exit_code"] == 78


def test_a_stale_config_of_an_earlier_run_is_refused(tmp_path: Path, termination_log: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_run(tmp_path / "run.yaml", tiny_spec("train.csv"), uid="old-uid")
    monkeypatch.setenv("KUBETUNE_RUN_UID", "new-uid")
    code, events, _ = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    (failed,) = of_type(events, "failed")
    assert code == 78 and failed.reason == "InvalidConfig"
    assert failed.message and "old-uid" in failed.message and "new-uid" in failed.message
    assert "stale" in failed.message
    assert parse_termination_message(termination_log.read_text()) == [failed]


def test_a_bad_contract_variable_is_an_invalid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_run(tmp_path / "run.yaml", tiny_spec("train.csv"))
    monkeypatch.setenv("KUBETUNE_ATTEMPT", "second")
    code, events, _ = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    (failed,) = of_type(events, "failed")
    assert code == 78 and failed.reason == "InvalidConfig"
    assert failed.message and "KUBETUNE_ATTEMPT" in failed.message


def test_resume_from_a_checkpoint_the_store_lacks_fails_instead_of_starting_over(
        tmp_path: Path, synthetic_data: dict[str, Path], termination_log: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), training={"epochs": 1, "maxSteps": 2})
    monkeypatch.setenv("KUBETUNE_RESUME_FROM", "s3://models/kubetune/team-a/tiny/checkpoints/step-00000002.pt")
    code, events, _ = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                   "--output-dir", str(tmp_path / "out")])
    (failed,) = of_type(events, "failed")
    assert code == 78 and failed.reason == "CheckpointMissing" and failed.retryable is False
    assert failed.message and "step-00000002" in failed.message
    assert not of_type(events, "started") and not of_type(events, "progress")  # nothing trained
    assert parse_termination_message(termination_log.read_text()) == [failed]


def test_the_emitter_writes_only_what_it_can(tmp_path: Path) -> None:
    import io

    from kubetune_trainer.events import Emitter

    emitter = Emitter(stream=io.StringIO())
    target = tmp_path / "message"
    assert not emitter.write_termination_message(str(target)) and not target.exists()  # nothing to say yet
    emitter.emit("evaluation", stage="after", epoch=1, metrics={"R@1": float("nan")})  # dropped, not a crash
    emitter.emit("evaluation", stage="epoch", epoch=1, metrics={"R@1": 0.5})  # not the final evaluation
    emitter.emit("failed", reason="Preempted", message="signal 15", retryable=True, exit_code=75)
    assert not emitter.write_termination_message(str(tmp_path / "missing-dir" / "message"))  # skipped silently
    assert not emitter.write_termination_message(None)
    assert emitter.write_termination_message(str(target))
    (failed,) = parse_termination_message(target.read_text())
    assert failed.reason == "Preempted"
    other_rank = Emitter(stream=io.StringIO(), enabled=False)
    other_rank.emit("failed", reason="Preempted")
    assert not other_rank.write_termination_message(str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1").exists()
