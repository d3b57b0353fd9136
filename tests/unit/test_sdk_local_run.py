"""A local run is a :class:`kubetune.Run`: the same verbs as a cluster run, its status folded from the trainer's
output by the operator's own fold (a scripted fake trainer here; the real one runs in test_sdk_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetune.api import errors
from kubetune.api.events import MARKER
from kubetune.sdk import local
from kubetune.sdk.client import Run

pytestmark = pytest.mark.unit
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def test_a_started_local_run_streams_its_log_and_ends_with_the_clusters_status(fake_python: str,
                                                                             tmp_path: Path) -> None:
    run = local.start_local(QUICKSTART, output_dir=tmp_path / "run", python=fake_python)
    assert isinstance(run, Run) and run.namespace == local.LOCAL_NAMESPACE
    lines = list(run.stream_logs(timeout=60))
    assert "step 1" in lines and "step 4" in lines and not any(line.startswith(MARKER) for line in lines)
    status = run.wait(timeout=60)
    assert status.phase == "Succeeded" and run.succeeded and run.exit_code == 0
    succeeded = next(c for c in status.conditions if c.type == "Succeeded")
    assert succeeded.status == "True" and succeeded.reason == "TrainingSucceeded"
    assert status.progress is not None and status.progress.percent == 100.0 and status.progress.step == 4
    assert status.artifact is not None and status.artifact.uri == str(run.artifact)
    assert run.metrics() == {"before": {"R@1": 0.1, "R@5": 0.3, "mean_rank": 9.0},
                             "after": {"R@1": 0.6, "R@5": 0.9, "mean_rank": 2.0}}
    assert status.metrics is not None and status.metrics.val_loss == 0.6
    assert "step 4" in run.logs() and MARKER in run.logs(include_events=True)
    assert run.events[0].type == "started" and run.events[-1].type == "finished"


def test_a_failed_local_run_reads_like_a_failed_cluster_run(fake_python: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    run = local.start_local(QUICKSTART, output_dir=tmp_path / "run", python=fake_python)
    with pytest.raises(errors.LocalRunFailed) as info:
        run.wait(timeout=60)
    assert info.value.reason == "InvalidData" and info.value.trainer_exit_code == 65
    status = run.status()
    assert status.phase == "Failed" and "x.png" in (status.message or "")
    with pytest.raises(errors.RunFailed):
        run.save_artifact(tmp_path / "model")


def test_cancelling_a_local_run_stops_its_trainer_and_ends_it_cancelled(fake_python: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "hang")
    run = local.start_local(QUICKSTART, output_dir=tmp_path / "run", python=fake_python)
    for line in run.stream_logs(timeout=60):
        if line == "step 2":
            break
    assert run.status().phase == "Running"
    with pytest.raises(errors.RunNotFinished):
        run.wait(timeout=0.2)
    assert run.cancel().startswith("cancelled")
    status = run.status()
    assert status.phase == "Cancelled" and run.exit_code != 0
    assert run.cancel() == "already Cancelled"


def test_fit_local_writes_its_data_into_the_run_directory_and_returns_a_run(
        fake_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import kubetune
    import yaml
    from kubetune import Document, DocumentArray
    from PIL import Image

    monkeypatch.setattr(local, "start_local", functools.partial(local.start_local, python=fake_python))
    photo = tmp_path / "shirt.jpg"
    Image.new("RGB", (224, 224), (200, 30, 30)).save(photo)
    train = DocumentArray([Document(chunks=[Document(uri=str(photo)), Document(text=f"a red shirt, view {i}")])
                           for i in range(3)])
    run = kubetune.fit(model="ViT-B-32", train_data=train, epochs=2, device="cpu", local=True,
                       run_name="shirts", output_dir=tmp_path / "runs" / "shirts")
    assert isinstance(run, kubetune.Run) and run.name == "shirts"
    assert run.wait(timeout=60).phase == "Succeeded"
    doc = yaml.safe_load((run.output_dir / "run.yaml").read_text())
    assert doc["metadata"]["name"] == "shirts" and doc["spec"]["resources"]["gpus"] == 0
    rows = (Path(doc["spec"]["data"]["train"])).read_text().splitlines()
    assert rows[0] == "text,image" and len(rows) == 4
    assert Path(doc["spec"]["data"]["train"]).is_relative_to(run.output_dir / "inputs")
    assert run.metrics()["after"]["R@1"] == 0.6
