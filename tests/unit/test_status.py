"""Pure status folding: events → bounded status patches; pod/job state → outcomes."""

from __future__ import annotations

import json

import pytest
from kubetune.api.events import format_event
from kubetune.api.spec import FinetuneRunStatus
from kubetune.lifecycle.conditions import (
    CANCELLED,
    CLEANED_UP,
    MAX_CONDITIONS,
    RUNNING,
    get_condition,
    is_terminal,
    set_condition,
    transition,
)
from kubetune.lifecycle.fold import LogCursor, StatusFolder, Throttle, status_size
from kubetune.lifecycle.formats import now_rfc3339, parse_rfc3339
from kubetune.lifecycle.observed import JobState, PodState, job_state, pod_state
from kubetune.lifecycle.outcome import POD_DELETED, attempt_outcome
from kubetune.lifecycle.policy import cancel_pending, cancel_request, cancel_update, ttl_due

pytestmark = pytest.mark.unit


def test_progress_metrics_artifact_fold() -> None:
    f = StatusFolder()
    f.feed_line(format_event("started", run="r", model="ViT-B-32", epochs=2, total_steps=10), 100.0)
    f.feed_line("loading data", 100.1)
    f.feed_line(format_event("evaluation", stage="before", metrics={"recall_at_k": 0.5, "mrr": 0.2}), 100.2)
    f.feed_line(format_event("progress", epoch=1, epochs=2, step=2, total_steps=10, loss=2.5,
                             samples_per_second=12.5), 101.0)
    f.feed_line(format_event("progress", epoch=1, epochs=2, step=4, total_steps=10, loss=2.0), 103.0)
    f.feed_line(format_event("metrics", stage="val", val_loss=1.9, train_loss=2.1), 103.5)
    f.feed_line(format_event("checkpoint", uri="s3://b/ckpt/step-4", step=4), 103.6)
    patch, times = f.take_patch()
    assert times == [100.0, 100.1, 100.2, 101.0, 103.0, 103.5, 103.6]
    progress = patch["progress"]
    assert progress["step"] == 4 and progress["totalSteps"] == 10 and progress["percent"] == 40.0
    assert progress["etaSeconds"] == 6.0  # 2 steps in 2 s, 6 left
    assert progress["summary"] == "1/2 40%"
    assert progress["samplesPerSecond"] == 12.5
    assert patch["metrics"]["trainLoss"] == 2.1 and patch["metrics"]["valLoss"] == 1.9
    assert patch["metrics"]["before"] == {"recall_at_k": 0.5, "mrr": 0.2}
    assert patch["checkpoint"] == "s3://b/ckpt/step-4"
    assert patch["logTail"] == ["loading data"]
    FinetuneRunStatus.model_validate(patch)  # the patch fits the status model (and thus the CRD schema)
    # Nothing new → empty patch.
    assert f.take_patch() == ({}, [])
    f.feed_line(format_event("evaluation", stage="after", metrics={"recall_at_k": 0.8}), 110)
    f.feed_line(format_event("artifact", uri="s3://b/run/", size=1234, sha256="ab" * 32), 111)
    f.feed_line(format_event("finished", artifact_uri="s3://b/run/"), 112)
    patch, _ = f.take_patch()
    assert patch["artifact"] == {"uri": "s3://b/run/", "size": 1234, "sha256": "ab" * 32}
    assert patch["metrics"]["after"] == {"recall_at_k": 0.8}
    assert patch["progress"]["percent"] == 100.0 and patch["progress"]["step"] == 10
    assert f.started and f.finished


@pytest.mark.parametrize(("fields", "expected"), [
    ({"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "weights_from": "s3://models/ViT-B-32/x.bin"},
     {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "source": "s3://models/ViT-B-32/x.bin"}),
    ({"model": "tiny", "weights_from": "random init"}, {"model": "tiny", "source": "random init"}),
    ({"model": "ViT-B-32", "weights_from": "https://store.example/a.pt?X-Amz-Signature=secret"},
     {"model": "ViT-B-32", "source": "https://store.example/a.pt"}),
], ids=["tag-from-the-mirror", "random-init", "presigned-url"])
def test_what_the_trainer_started_from_folds_into_status(fields: dict[str, str], expected: dict[str, str]) -> None:
    f = StatusFolder()
    f.feed_line(format_event("started", run="r", epochs=1, total_steps=2, **fields), 100.0)
    patch, _ = f.take_patch()
    assert patch["startedFrom"] == expected
    assert FinetuneRunStatus.model_validate(patch).started_from is not None
    assert "secret" not in json.dumps(patch)


def test_log_tail_and_sizes_are_bounded() -> None:
    f = StatusFolder()
    for i in range(1000):
        f.feed_line(f"line {i} " + "x" * 5000, float(i))
    f.feed_line(format_event("evaluation", stage="after", metrics={f"m{i}": float(i) for i in range(500)}), 1.0)
    f.feed_line('KUBETUNE_EVENT {"type": "progress", "loss": NaN, "step": 3}', 2.0)
    f.update({"message": "m" * 10})
    patch, _ = f.take_patch()
    assert len(patch["logTail"]) == 30 and patch["logTail"][-1].startswith("line 999")
    assert all(len(line) <= 500 for line in patch["logTail"])
    assert len(patch["metrics"]["after"]) <= 64
    assert "trainLoss" not in patch["metrics"]
    assert status_size(patch) < 20_000
    json.dumps(patch, allow_nan=False)  # valid JSON for the API server
    FinetuneRunStatus.model_validate(patch)


def test_garbage_lines_never_raise() -> None:
    f = StatusFolder()
    for line in ["KUBETUNE_EVENT {", "KUBETUNE_EVENT []", "KUBETUNE_EVENT " + "9" * 70000,
                 'KUBETUNE_EVENT {"type": "nope"}', "", "\r\n"]:
        assert f.feed_line(line, 1.0) is None
    patch, _ = f.take_patch()
    assert len(patch.get("logTail", [])) == 4  # the non-empty, non-event lines are kept as text


def test_transitions_and_conditions() -> None:
    status: dict = {}
    patch = transition(status, "Running", "TrainerStarted", "started", 1000.0)
    assert patch["phase"] == "Running" and patch["startTime"] == "1970-01-01T00:16:40Z"
    status.update(patch)
    running = get_condition(status["conditions"], "Running")
    assert running is not None and running["status"] == "True"
    # Same status again keeps lastTransitionTime.
    again = transition(status, "Running", "TrainerStarted", "still", 2000.0)
    assert get_condition(again["conditions"], "Running")["lastTransitionTime"] == running["lastTransitionTime"]
    status.update(transition(status, "Succeeded", "TrainingSucceeded", "done", 3000.0))
    assert get_condition(status["conditions"], "Running")["status"] == "False"
    assert get_condition(status["conditions"], "Succeeded")["status"] == "True"
    assert status["completionTime"] == "1970-01-01T00:50:00Z"
    assert is_terminal(status)
    conds: list = []
    for i in range(40):
        conds = set_condition(conds, f"T{i}", "True", "R", "m", 1.0)
    assert len(conds) == MAX_CONDITIONS


def test_outcomes() -> None:
    ok = attempt_outcome(exit_code=0, retries=0, backoff_limit=3)
    assert ok.action == "succeed"
    retry = attempt_outcome(exit_code=75, retries=1, backoff_limit=3)
    assert retry.action == "retry" and "2/3" in retry.message
    assert attempt_outcome(exit_code=137, retries=3, backoff_limit=3).reason == "BackoffLimitExceeded"
    assert attempt_outcome(exit_code=78, retries=0, backoff_limit=3).reason == "InvalidConfig"
    assert attempt_outcome(exit_code=65, retries=0, backoff_limit=3).action == "fail"
    assert attempt_outcome(exit_code=1, retries=0, backoff_limit=3).reason == "TrainerError"
    assert attempt_outcome(exit_code=137, pod_reason="OOMKilled", retries=0, backoff_limit=3).reason == "OutOfMemory"
    deadline = JobState("j", failed=True, reason="DeadlineExceeded", message="Job was active longer")
    assert attempt_outcome(exit_code=None, job=deadline, retries=0, backoff_limit=3).reason == "DeadlineExceeded"
    assert attempt_outcome(exit_code=None, pod_reason="Evicted", retries=0, backoff_limit=3).action == "retry"
    lost = JobState("j", failed=True, reason="BackoffLimitExceeded")
    deleted = attempt_outcome(exit_code=None, pod_reason=POD_DELETED, job=lost, retries=0, backoff_limit=3)
    assert deleted.action == "retry" and "PodDeleted" in deleted.message


def test_pod_and_job_state() -> None:
    pod = {"metadata": {"name": "p", "creationTimestamp": "2026-11-23T16:06:00Z"},
           "status": {"phase": "Failed", "containerStatuses": [
               {"name": "trainer", "state": {"terminated": {"exitCode": 75, "reason": "Error"}}}]}}
    ps = pod_state(pod)
    assert ps.terminated and ps.exit_code == 75 and ps.started and ps.created is not None and not ps.deleting
    assert pod_state({**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2026-11-23T16:07:00Z"}}).deleting
    waiting = {"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}]}}
    ws = pod_state(waiting)
    assert ws.waiting_reason == "ImagePullBackOff" and not ws.started and not ws.terminated
    job = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "m"}]}}
    assert job_state(job).failed and job_state(job).reason == "DeadlineExceeded"
    assert not job_state({"metadata": {"name": "j"}}).failed


def test_throttle_and_ttl() -> None:
    t = Throttle(1.0)
    assert t.due(0.0)
    t.flushed(0.0)
    assert not t.due(0.5) and t.due(0.5, urgent=True) and t.due(1.0)
    assert t.delay(0.25) == 0.75
    finished = {"phase": "Succeeded", "completionTime": "1970-01-01T00:00:10Z", "conditions": []}
    assert not ttl_due(finished, 5, 14.0)
    assert ttl_due(finished, 5, 15.0)
    assert not ttl_due(finished, None, 1e9)
    assert not ttl_due({"phase": "Running"}, 0, 1e9)
    cleaned = {**finished, "conditions": set_condition([], CLEANED_UP, "True", "TTLExpired", "", 20.0)}
    assert not ttl_due(cleaned, 5, 100.0)


def test_rfc3339_parsing() -> None:
    assert parse_rfc3339("1970-01-01T00:00:10Z") == 10.0
    assert parse_rfc3339("1970-01-01T00:00:10.123456789Z") == pytest.approx(10.123456)
    assert parse_rfc3339("garbage") is None and parse_rfc3339(None) is None


def test_cancel_request_is_terminal_and_never_relaunched() -> None:
    from kubetune.api.spec import CANCEL_ANNOTATION, CANCEL_BY_ANNOTATION
    from kubetune.operator.handlers import _active, _cancel_pending

    plain: dict[str, object] = {"annotations": {"other": "x"}}
    asked = {"annotations": {CANCEL_ANNOTATION: "2026-01-02T03:04:05Z", CANCEL_BY_ANNOTATION: "alice"}}
    bare = {"annotations": {CANCEL_ANNOTATION: ""}}  # any value counts
    running = {"phase": "Running", "attempts": 1, "startTime": "2026-01-02T03:00:00Z",
               "conditions": set_condition([], RUNNING, "True", "PodRunning", "running", 0.0)}
    assert cancel_request(plain) is None and cancel_request(None) is None
    assert cancel_request(asked) == {"at": "2026-01-02T03:04:05Z", "by": "alice"}
    assert cancel_request(bare) == {"at": "", "by": ""}
    assert not cancel_pending(plain, running)
    for phase in ("Pending", "Running", "Suspended", None):
        assert cancel_pending(asked, {**running, "phase": phase})
    for phase in ("Succeeded", "Failed", "Cancelled"):  # ended runs keep their phase
        assert not cancel_pending(asked, {**running, "phase": phase})

    update = cancel_update(running, asked, 1, 1_000.0)
    assert update["phase"] == "Cancelled" and is_terminal(update)
    assert update["completionTime"] == now_rfc3339(1_000.0)
    cond = get_condition(update["conditions"], CANCELLED)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "Cancelled"
    assert "by alice at 2026-01-02T03:04:05Z" in cond["message"] and "deleted 1 Job(s)" in update["message"]
    assert (get_condition(update["conditions"], RUNNING) or {})["status"] == "False"
    assert cancel_update({}, bare, 0, 1.0)["message"].startswith("Cancelled (kubetune.io/cancel-requested)")

    # The supervisor daemon never runs for a cancel-requested run, suspended or not, nor after Cancelled
    # (kopf evaluates this on create, on resume after an operator restart and on every change, unsuspend too).
    spec = {"runPolicy": {"suspend": False}}
    assert _active(spec=spec, status=running, meta=plain)
    assert not _active(spec=spec, status=running, meta=asked)
    assert not _active(spec=spec, status={**running, **update}, meta=asked)
    assert not _active(spec=spec, status={**running, **update}, meta=plain)
    assert _cancel_pending(meta=asked, status=running) and not _cancel_pending(meta=asked, status=update)


def test_progress_storage_keeps_the_cancel_annotation_in_the_essence() -> None:
    from kubetune.api.spec import CANCEL_ANNOTATION
    from kubetune.operator.handlers import ProgressStorage

    storage = ProgressStorage(prefix="kubetune.io")
    essence = {"spec": {"a": 1}, "metadata": {"annotations": {"kubetune.io/supervisor": "{}", "x": "y",
                                                              CANCEL_ANNOTATION: ""}}}
    assert storage.clear(essence=essence)["metadata"]["annotations"] == {"x": "y", CANCEL_ANNOTATION: ""}
    assert "metadata" not in storage.clear(essence={"spec": {}, "metadata": {"annotations": {"kubetune.io/a": "1"}}})


def test_log_cursor_skips_exactly_what_a_reconnect_replays() -> None:
    cursor = LogCursor()
    assert cursor.since_time() is None
    read = [10.2, 10.5, 10.5, 10.7, None]
    assert [cursor.accept(t) for t in read] == [True] * 5
    assert cursor.since_time() == 10 and cursor.seen_at_last == 1
    cursor.reopened()  # the server replays from 10 s: everything up to 10.7 again, then new lines
    assert [cursor.accept(t) for t in [10.2, 10.5, 10.5, 10.7, 10.7, 11.0]] == [False] * 4 + [True, True]
    cursor.reopened()
    assert [cursor.accept(t) for t in [11.0, 11.0, 11.5]] == [False, True, True]


def test_log_cursor_persisted_in_status_resumes_a_restarted_reader_where_the_status_stopped() -> None:
    stamps = ["2026-12-02T10:00:00.100000001Z", "2026-12-02T10:00:00.200000000Z",
              "2026-12-02T10:00:00.200000000Z"]
    cursor = LogCursor()
    for stamp in stamps:
        assert cursor.accept(parse_rfc3339(stamp), stamp)
    saved = cursor.to_status("run-a1-x")
    assert saved == {"pod": "run-a1-x", "time": stamps[-1], "lines": 2}
    status = {"podName": "run-a1-x", "logCursor": saved}
    restored = LogCursor.from_status(status, "run-a1-x")
    assert restored.since_time() == cursor.since_time()
    # the restarted stream replays the whole second: only what follows the persisted lines is new
    replay = [*stamps, "2026-12-02T10:00:00.200000000Z", "2026-12-02T10:00:01.000000000Z"]
    assert [restored.accept(parse_rfc3339(s), s) for s in replay] == [False] * 3 + [True, True]
    assert LogCursor.from_status(status, "run-a2-y").last_ts is None  # another pod: read from the start
    assert LogCursor.from_status({}, "run-a1-x").to_status("run-a1-x") is None


def test_pod_state_tells_alive_succeeded_and_gone() -> None:
    running = PodState("p", "Running", started=True)
    done = PodState("p", "Succeeded", exit_code=0, started=True)
    assert running.alive and not running.succeeded
    assert done.succeeded and not done.alive
    assert not PodState("p", "Running", gone=True).alive


def test_epoch_evaluations_and_the_wise_ft_frontier_fold_into_status() -> None:
    f = StatusFolder()
    for epoch, r5 in ((1, 0.4), (2, 0.6), (2, 0.65)):  # a resumed attempt re-reports epoch 2: kept once
        f.feed_line(format_event("evaluation", stage="epoch", epoch=epoch,
                                 metrics={"R@5": r5, "R@1": r5 / 2, "clip-text-to-clip-vision_dcg_at_k": 1.0}), 1.0)
    frontier = [{"alpha": a, "target": t, "reference": r}
                for a, t, r in ((0.0, 0.3, 0.8), (0.5, 0.6, 0.78), (1.0, 0.7, 0.5))]
    f.feed_line(format_event("evaluation", stage="wise_ft", epoch=3, metrics={"alpha": 0.5, "target": 0.6},
                             alpha=0.5, metric="R@5", keep_reference=0.95, frontier=frontier), 2.0)
    patch, _ = f.take_patch()
    metrics = patch["metrics"]
    assert metrics["epochs"] == [{"epoch": 1.0, "R@5": 0.4, "R@1": 0.2}, {"epoch": 2.0, "R@5": 0.65, "R@1": 0.325}]
    assert metrics["wiseFt"] == {"alpha": 0.5, "metric": "R@5", "keepReference": 0.95, "frontier": frontier}
    assert "wise_ft" not in metrics and "epoch" not in metrics  # no stage-named dicts besides before/after
    FinetuneRunStatus.model_validate({"metrics": metrics})  # the CRD's status schema takes it
