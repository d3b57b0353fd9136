"""The trainer's termination message: its final events, bounded to what Kubernetes keeps, and the stand-in
image's stdlib copy of the format."""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kubetune.api.events import (
    MARKER,
    TERMINATION_MESSAGE_MAX_BYTES,
    TERMINATION_METRICS,
    Event,
    format_event,
    parse_line,
    parse_termination_message,
    termination_message,
)

pytestmark = pytest.mark.unit

STANDIN = Path(__file__).resolve().parents[1] / "images" / "standin" / "standin.py"
URI = "s3://models/kubetune/team-a/clip-ft/artifact"
SHA = "ab" * 32


def _event(kind: str, **fields: Any) -> Event:
    event = parse_line(format_event(kind, **fields))  # type: ignore[arg-type]
    assert event is not None
    return event


def _run_events(after_metrics: dict[str, float], end: Event) -> list[Event]:
    return [
        _event("started", run="clip-ft", model="ViT-B-32", epochs=2, total_steps=10, attempt=1, time=1.0),
        _event("evaluation", stage="before", epoch=0, metrics={"R@1": 0.1}, time=2.0),
        _event("progress", step=10, total_steps=10, loss=0.5, time=3.0),
        _event("checkpoint", uri="s3://models/x/checkpoints/step-00000010.pt", step=10, epoch=2, time=4.0),
        _event("evaluation", stage="after", epoch=2, metrics=after_metrics, time=5.0),
        _event("artifact", uri=URI, size=123456789, sha256=SHA, files=7, time=6.0),
        end,
    ]


def _size(text: str) -> int:
    return len(text.encode())


FINISHED = _event("finished", artifact_uri=URI, duration_seconds=12.5, step=10, time=7.0)
METRICS = {"R@1": 0.5, "R@5": 0.75, "R@10": 0.875, "reciprocal_rank": 0.625, "ndcg_at_k": 0.7,
           "image_to_text_R@1": 0.45, "precision_at_k": 0.3, "zero_shot_top1": 0.2, "val_loss": 1.25}


def test_a_finished_run_keeps_artifact_key_metrics_and_finished_in_order() -> None:
    events = _run_events(METRICS, FINISHED)
    text = termination_message(events)
    assert "\n\n" not in text and not text.endswith("\n")
    lines = text.split("\n")
    assert all(line.startswith(MARKER) for line in lines)
    evaluation, artifact, finished = parse_termination_message(text)
    assert (evaluation.type, evaluation.stage, evaluation.epoch) == ("evaluation", "after", 2)
    assert evaluation.metrics == {k: METRICS[k] for k in (*TERMINATION_METRICS, "val_loss")}
    assert artifact == events[5] and lines[1] == format_event("artifact", uri=URI, size=123456789, sha256=SHA,
                                                              files=7, time=6.0)
    assert finished == FINISHED
    assert artifact.model_extra == {"files": 7}


def test_the_last_end_event_wins_and_nothing_gives_an_empty_message() -> None:
    failed = _event("failed", reason="Preempted", message="SIGTERM", retryable=True, exit_code=75, time=8.0)
    assert parse_termination_message(termination_message([*_run_events(METRICS, FINISHED), failed]))[-1] == failed
    assert termination_message([]) == ""
    assert termination_message([_event("progress", step=1)]) == ""
    (only,) = parse_termination_message(termination_message([_event("evaluation", stage="after", metrics={"m": 1}),
                                                              failed]))
    assert only == failed  # an evaluation without any key metric says nothing the status uses


def test_a_huge_metrics_dict_is_trimmed_to_the_key_metrics() -> None:
    metrics = {**{f"metric_{i:04d}_" + "x" * 40: i / 1000 for i in range(1000)}, **METRICS}
    events = _run_events({}, FINISHED)
    events[4] = Event(type="evaluation", stage="after", epoch=2, metrics=metrics, time=5.0)  # not cut to 64
    text = termination_message(events)
    assert _size(text) <= TERMINATION_MESSAGE_MAX_BYTES
    evaluation, artifact, finished = parse_termination_message(text)
    assert set(evaluation.metrics or {}) == {*TERMINATION_METRICS, "val_loss"}
    assert artifact.uri == URI and finished == FINISHED


@pytest.mark.parametrize("limit", range(900, 1400, 20))
def test_metrics_go_least_important_first_then_the_evaluation(limit: int) -> None:
    events = _run_events(METRICS, FINISHED)
    text = termination_message(events, limit=limit)
    assert _size(text) <= limit
    parsed = parse_termination_message(text)
    assert [e.type for e in parsed][-2:] == ["artifact", "finished"]
    kept = list((parsed[0].metrics or {}) if parsed[0].type == "evaluation" else {})
    order = [*TERMINATION_METRICS, "val_loss"]
    assert sorted(kept, key=order.index) == order[:len(kept)]  # a prefix of the priority list


@pytest.mark.parametrize("filler", ["x", 'é"\\\n', "\x00"])
def test_a_10kb_failure_message_is_cut_and_the_artifact_kept(filler: str) -> None:
    message = (filler * 10_000)[:10_000]
    failed = _event("failed", reason="TrainerError", message=message, retryable=False, exit_code=1, time=8.0)
    text = termination_message(_run_events({k: METRICS[k] for k in TERMINATION_METRICS}, failed))
    assert TERMINATION_MESSAGE_MAX_BYTES - 100 < _size(text) <= TERMINATION_MESSAGE_MAX_BYTES
    parsed = parse_termination_message(text)
    assert [e.type for e in parsed] == ["artifact", "failed"]  # the evaluation goes before the message is cut
    assert parsed[0].uri == URI and parsed[0].sha256 == SHA
    cut = parsed[1]
    assert cut.reason == "TrainerError" and cut.retryable is False and (cut.model_extra or {})["exit_code"] == 1
    assert cut.message and cut.message.endswith("...") and message.startswith(cut.message[:-3])


def test_absurd_events_drop_whole_lines_never_part_of_one() -> None:
    huge = _event("finished", artifact_uri="s3://b/" + "k" * 5000, duration_seconds=1.0)
    text = termination_message(_run_events(METRICS, huge))
    assert text == ""  # nothing fits: an empty message, and Kubernetes falls back to the log tail
    text = termination_message(_run_events(METRICS, huge), limit=10_000)
    assert [e.type for e in parse_termination_message(text)] == ["evaluation", "artifact", "finished"]


@pytest.mark.parametrize("text", [None, "", "garbage", "KUBETUNE_EVENT {", "KUBETUNE_EVENT []", "\x00\xff",
                                  "KUBETUNE_EVENT " + "{" * 100_000, 'KUBETUNE_EVENT {"type": "nope"}', 42])
def test_parse_never_raises(text: Any) -> None:
    assert parse_termination_message(text) == []


def test_parse_reads_a_log_tail_and_a_cut_message() -> None:
    tail = "\n".join(["Traceback (most recent call last):", format_event("progress", step=3),
                      "RuntimeError: boom", format_event("failed", reason="TrainerError", message="boom")])
    assert [e.type for e in parse_termination_message(tail)] == ["progress", "failed"]
    whole = termination_message(_run_events(METRICS, FINISHED))
    cut = whole.encode()[:len(whole) // 2].decode()  # what a byte-limited reader of a longer file would see
    assert all(e.type in ("evaluation", "artifact") for e in parse_termination_message(cut))
    assert parse_termination_message(whole.replace("\n", "\r\n")) == parse_termination_message(whole)


# ----------------------------------------------------------------------------------------- the stand-in's copy
@pytest.fixture()
def standin() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("kt_standin", STANDIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = signal.getsignal(signal.SIGTERM)
    yield module
    signal.signal(signal.SIGTERM, handler)  # its main() installs its own


def _as_dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [e.model_dump(exclude_none=True) for e in events]


@pytest.mark.parametrize("case", ["finished", "huge-metrics", "10kb-failure", "tiny-limit"])
def test_the_standin_writes_the_same_message(case: str, standin: ModuleType) -> None:
    metrics = {**{f"m{i}" + "y" * 30: 0.5 for i in range(500)}, **METRICS} if case == "huge-metrics" else METRICS
    end = FINISHED if case != "10kb-failure" else _event("failed", reason="X", message='"é' * 5000, exit_code=1,
                                                         retryable=False, time=9.0)
    events = _run_events({}, end)
    events[4] = Event(type="evaluation", stage="after", epoch=2, metrics=metrics, time=5.0)
    limit = 700 if case == "tiny-limit" else TERMINATION_MESSAGE_MAX_BYTES
    ours = standin.termination_message(_as_dicts(events), limit)
    assert ours == termination_message(events, limit)
    assert parse_termination_message(ours) == parse_termination_message(termination_message(events, limit))


def _standin_config(tmp_path: Path, uid: str = "u-1", **behaviour: Any) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
        "metadata": {"name": "sr", "namespace": "team-a", "uid": uid},
        "spec": {"model": {"name": "standin", "config": {"standin": {"steps": 2, "pace": 0, **behaviour}}},
                 "output": {"bucket": "models", "prefix": "kubetune"}, "training": {"epochs": 1}}}))
    return path


def _run_standin(standin: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str], config: Path, **env: str) -> tuple[int, list[Event], list[Event]]:
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv("KUBETUNE_CONFIG", str(config))
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    standin.summary.clear()
    code = standin.main()
    stdout = [e for e in (parse_line(line) for line in capsys.readouterr().out.splitlines()) if e is not None]
    return code, stdout, parse_termination_message(log.read_text()) if log.exists() else []


def test_the_standin_honours_the_contract(standin: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = _standin_config(tmp_path)
    code, stdout, summary = _run_standin(standin, tmp_path, monkeypatch, capsys, config, KUBETUNE_RUN_UID="u-1")
    assert code == 0
    assert summary[1:] == [e for e in stdout if e.type in ("artifact", "finished")]
    assert summary[0].stage == "after" and summary[0].metrics == {"R@5": 0.75}  # the key metrics only

    code, stdout, summary = _run_standin(standin, tmp_path, monkeypatch, capsys, config, KUBETUNE_RUN_UID="u-2")
    assert code == 78 and [e.reason for e in summary] == ["InvalidConfig"] and summary == stdout[-1:]

    code, stdout, summary = _run_standin(standin, tmp_path, monkeypatch, capsys, config, KUBETUNE_RUN_UID="u-1",
                                         KUBETUNE_RESUME_FROM="s3://models/kubetune/team-a/sr/nothing-here")
    assert code == 78 and [e.reason for e in summary] == ["CheckpointMissing"]

    code, stdout, summary = _run_standin(standin, tmp_path, monkeypatch, capsys, config,
                                         KUBETUNE_RESUME_FROM="s3://models/kubetune/team-a/sr/checkpoints/step-1")
    assert code == 0 and (next(e for e in stdout if e.type == "started").model_extra or {})["resumed_from_step"] == 1

    failing = _standin_config(tmp_path, exit_code=75)
    code, stdout, summary = _run_standin(standin, tmp_path, monkeypatch, capsys, failing)
    assert code == 75 and [(e.type, e.retryable) for e in summary] == [("failed", True)]
