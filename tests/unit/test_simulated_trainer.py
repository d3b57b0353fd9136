"""The simulated kubelets' trainer script: the real trainer's event contract, timed from the container's start."""

from __future__ import annotations

from kubetune.api.events import parse_line, parse_termination_message
from kubetune.lifecycle.formats import parse_rfc3339

from tests.cluster.simkubelet import rfc3339_nano, trainer_script

CONFIG = {"metadata": {"name": "r", "namespace": "ns"},
          "spec": {"training": {"epochs": 2}, "model": {"config": {"standin": {"steps": 4, "pace": 5}}}}}


def test_the_script_is_the_trainers_event_stream_in_order_and_on_pace() -> None:
    script = trainer_script(CONFIG, attempt=1, start=1000.0)
    events = [(t, e) for t, line in script.lines if (e := parse_line(line)) is not None]
    kinds = [e.type for _, e in events]
    assert kinds[:2] == ["started", "evaluation"] and kinds[-3:] == ["evaluation", "artifact", "finished"]
    progress = [(t, e.step) for t, e in events if e.type == "progress"]
    assert progress == [(5.0, 1), (10.0, 2), (15.0, 3), (20.0, 4)]
    assert all(e.time == 1000.0 + t for t, e in events)
    assert kinds.count("checkpoint") == 2 and script.exit_code == 0
    assert [e.type for e in parse_termination_message(script.message)] == ["evaluation", "artifact", "finished"]
    assert script.duration >= 20.0


def test_a_failing_attempt_fails_and_a_later_one_succeeds() -> None:
    behaviour = {"steps": 2, "pace": 1, "exit_code": 75, "fail_attempts": 1}
    config = {**CONFIG, "spec": {"model": {"config": {"standin": behaviour}}}}
    first, second = trainer_script(config, 1, 0.0), trainer_script(config, 2, 0.0)
    assert first.exit_code == 75 and parse_termination_message(first.message)[-1].type == "failed"
    assert second.exit_code == 0


def test_log_timestamps_are_a_kubelets_rfc3339_with_nanoseconds() -> None:
    for t in (1796304263.319551706, 1796304263.0, 1796304263.9999999999):
        stamp = rfc3339_nano(t)
        assert stamp.endswith("Z") and len(stamp.split(".")[1]) == 10, stamp
        assert abs(parse_rfc3339(stamp) - t) < 1e-6
