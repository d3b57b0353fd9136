"""The trainer against a real S3 server (SeaweedFS): data and weights from s3://, checkpoints and the
artifact to the bucket under <prefix>/<namespace>/<name>/, resume from an S3 checkpoint, SDK-style download."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.spec import OutputSpec
from kubetune.storage import ObjectNotFound, run_store, s3_store, sha256_file, verify_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "trainer"))
from kt_trainer_helpers import of_type, run_trainer, tiny_spec, write_run


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n=128, eval_n=16, size=32, seed=0)


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_store_round_trip(s3_server: Any, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path) -> None:
    store = s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/kubetune", env=s3_env).child("ns/run")
    source = tmp_path / "blob"
    source.write_bytes(bytes(range(256)) * 100)
    store.put_file("checkpoints/step-00000001.pt", source)
    store.put_bytes("checkpoints/latest.json", b'{"step": 1}')
    store.put_bytes("checkpoints2/other", b"x")
    assert store.list("checkpoints") == ["checkpoints/latest.json", "checkpoints/step-00000001.pt"]
    assert store.exists("checkpoints/latest.json") and not store.exists("checkpoints/nope")
    store.get_file("checkpoints/step-00000001.pt", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == source.read_bytes()
    assert store.get_bytes("checkpoints/latest.json") == b'{"step": 1}'
    store.delete("checkpoints/latest.json")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("checkpoints/latest.json")
    assert store.uri("a") == f"s3://{s3_bucket}/kubetune/ns/run/a"


def test_training_with_s3_data_checkpoints_artifact_and_resume(
        s3_server: Any, s3_client: Any, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path,
        synthetic_data: dict[str, Path]) -> None:
    from kubetune_trainer import export

    # the dataset goes to the bucket: the CSV's relative image paths resolve against its s3:// location
    data_dir = synthetic_data["train"].parent
    for path in [synthetic_data["train"], *sorted((data_dir / "images").glob("train-*.png"))]:
        s3_client.fput_object(s3_bucket, f"data/{path.relative_to(data_dir).as_posix()}", str(path))
        output = {"endpoint": s3_server.host_endpoint, "bucket": s3_bucket, "prefix": "runs"}
    spec = tiny_spec(f"s3://{s3_bucket}/data/train.csv",
                     data={"train": f"s3://{s3_bucket}/data/train.csv", "valSplit": 0.25},
                     training={"epochs": 2, "maxSteps": 5}, output=output,
                     runPolicy={"checkpointEverySteps": 2, "checkpointEveryEpochs": 0})
    config = write_run(tmp_path / "run.yaml", spec, name="s3-run", namespace="team-b")
    argv = ["--config", str(config), "--work-dir", str(tmp_path / "work")]
    code, events, raw = run_trainer(argv)
    assert code == 0, raw[-2000:]
    for secret in s3_env.values():
        assert secret not in raw
    (artifact,) = of_type(events, "artifact")
    assert artifact.uri == f"s3://{s3_bucket}/runs/team-b/s3-run/artifact"
    # every 2 steps, and the last step's before the final evaluation and export (the two newest are kept)
    assert [e.uri for e in of_type(events, "checkpoint")] == [
        f"s3://{s3_bucket}/runs/team-b/s3-run/checkpoints/step-0000000{step}.pt" for step in (2, 4, 5)]
    assert sorted(o.object_name for o in s3_client.list_objects(s3_bucket, prefix="runs/", recursive=True)
                  if "/checkpoints/step-" in o.object_name) == [
        f"runs/team-b/s3-run/checkpoints/step-0000000{step}.pt" for step in (4, 5)]

    # download it the way the SDK will, and check the manifest and the towers
    store = run_store(OutputSpec(**{"endpoint": s3_server.host_endpoint, "bucket": s3_bucket, "prefix": "runs"}),
                      "team-b", "s3-run")
    local = tmp_path / "downloaded"
    store.get_dir("artifact", local)
    assert verify_manifest(local) == []
    assert sha256_file(local / "manifest.json") == artifact.sha256
    assert export.load_tower(local / "clip-vision") is not None

    # a new run whose checkpoint history is in S3 resumes from it: drop the finished mark and the artifact
    store.delete("checkpoints/latest.json")
    store.put_bytes("checkpoints/latest.json",
                    b'{"key": "checkpoints/step-00000004.pt", "step": 4, "epoch": 1}')
    code, events, raw = run_trainer(argv)
    assert code == 0, raw[-2000:]
    assert of_type(events, "started")[0].model_extra["resumed_from_step"] == 4
    assert [e.step for e in of_type(events, "progress")] == [5]

    # continue training from the S3 artifact (spec.model.weights = the artifact directory)
    spec2 = tiny_spec(f"s3://{s3_bucket}/data/train.csv", training={"epochs": 1, "maxSteps": 1}, output=output,
                      model={"name": "kt-tiny", "config": spec["model"]["config"], "weights": artifact.uri},
                      callbacks={"evaluation": {"enabled": False}})
    config2 = write_run(tmp_path / "run2.yaml", spec2, name="s3-run-2", namespace="team-b")
    code, events, raw = run_trainer(["--config", str(config2), "--work-dir", str(tmp_path / "work2")])
    assert code == 0, raw[-2000:]


def test_a_run_created_again_under_a_deleted_runs_name_starts_afresh_and_leaves_its_data(
        s3_server: Any, s3_client: Any, s3_bucket: str, s3_env: dict[str, str], tmp_path: Path,
        synthetic_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl delete` then `apply` of one name: two objects with two uids. The second must train, not report the
    first one's artifact as its own, and the first one's artifact must stay as it was."""
    output = {"endpoint": s3_server.host_endpoint, "bucket": s3_bucket, "prefix": "reused"}
    spec = tiny_spec(str(synthetic_data["train"]), training={"epochs": 1, "maxSteps": 2}, output=output,
                     callbacks={"evaluation": {"enabled": False}})
    artifacts = {}
    for uid in ("0b6e0c7e-0000-4000-8000-000000000001", "0b6e0c7e-0000-4000-8000-000000000002"):
        monkeypatch.setenv("KUBETUNE_RUN_UID", uid)
        config = write_run(tmp_path / f"{uid}.yaml", spec, name="shoes", namespace="team-b", uid=uid)
        code, events, raw = run_trainer(["--config", str(config), "--work-dir", str(tmp_path / uid)])
        assert code == 0, raw[-2000:]
        assert [e.step for e in of_type(events, "progress")][-1:] == [2], "it trained"
        (artifacts[uid],) = of_type(events, "artifact")
        assert artifacts[uid].uri == f"s3://{s3_bucket}/reused/team-b/shoes/{uid}/artifact"
    first, second = artifacts.values()
    store = s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/reused/team-b/shoes")
    for uid, artifact in artifacts.items():
        local = tmp_path / f"pulled-{uid}"
        store.child(uid).get_dir("artifact", local)
        assert verify_manifest(local) == [] and sha256_file(local / "manifest.json") == artifact.sha256
    assert first.sha256 != second.sha256  # two artifacts, each with its own run in its metadata
