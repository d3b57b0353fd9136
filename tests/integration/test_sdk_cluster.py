"""The SDK and CLI against the harness cluster, the real S3 server and the operator (run as a subprocess),
with the stand-in trainer image as the Job: fit → upload → FinetuneRun → stream_logs → wait → metrics →
save_artifact (sha256-verified), submit of the quickstart file, cancel, logs after the pods are gone; and a
second submission under a taken name, which must leave the first run's uploaded data as it was."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubetune
import pytest
from kubetune.api import errors
from kubetune.api.spec import GROUP, PLURAL, VERSION
from kubetune.sdk.cli import app
from kubetune.sdk.client import Client
from PIL import Image
from typer.testing import CliRunner

from tests.integration.test_operator_support import (
    STANDIN_AFTER,
    STANDIN_BEFORE,
    crd_installed,
    operator,
    runs,
    standin,
    standin_image,
    wait_for,
)

__all__ = ["crd_installed", "operator", "runs", "standin_image"]

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SMALL = {"gpus": 0, "cpu": "50m", "memory": "64Mi"}
UPLOAD_ID = r"\d{8}T\d{6}Z-[0-9a-f]{8}"  # each submission's own folder under inputs/


@pytest.fixture
def s3_env(s3_server: Any, s3_bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[dict[str, str]]:
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    # the uploads are hundreds of objects: leave the shared S3 server as small as we found it
    from minio.deleteobjects import DeleteObject

    names = [DeleteObject(o.object_name) for o in s3_client.list_objects(s3_bucket, recursive=True)]
    for _ in s3_client.remove_objects(s3_bucket, names):
        pass
    s3_client.remove_bucket(s3_bucket)


@pytest.fixture
def client(cluster: Any, namespace: str, s3_env: dict[str, str]) -> Client:
    return Client(namespace=namespace, kubeconfig=cluster.kubeconfig)


def fit_standin(client: Client, name: str, s3_server: Any, bucket: str, steps: int = 8, pace: float = 0.3,
                **options: Any) -> kubetune.Run:
    return kubetune.fit("ViT-B-32", train_data=str(EXAMPLES / "data" / "eval.csv"), run_name=name, client=client,
                        model_config=standin(steps=steps, pace=pace)["config"], epochs=2,
                        output={"endpoint": s3_server.pod_endpoint, "bucket": bucket}, **SMALL, **options)


def put_fake_artifact(s3_client: Any, uri: str) -> str:
    """Files + manifest at ``uri`` (what the real trainer writes); returns the manifest's sha256."""
    from kubetune.storage import parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    files = {"clip-text/model.safetensors": b"t" * 1000, "clip-vision/model.safetensors": b"v" * 2000,
             "metrics.json": b'{"before": {}, "after": {}}'}
    manifest = json.dumps({"format": "kubetune-artifact/v1", "files": {
        k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in files.items()}}).encode()
    for key, data in {**files, "manifest.json": manifest}.items():
        s3_client.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))
    return hashlib.sha256(manifest).hexdigest()


def test_fit_stream_logs_wait_metrics_and_save_artifact(standin_image: str, operator: Any, client: Client,
                                                        s3_server: Any, s3_bucket: str, s3_client: Any,
                                                        kube_api: Any, namespace: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = fit_standin(client, "fit1", s3_server, s3_bucket)
    # local data went to S3 first: the CSV and its 64 images, under this submission's own inputs/<upload-id>/
    match = re.fullmatch(rf"s3://{s3_bucket}/(kubetune/{namespace}/fit1/inputs/{UPLOAD_ID}/train)/eval\.csv",
                         run.spec.data.train)
    assert match, run.spec.data.train
    prefix = match[1]
    keys = [o.object_name for o in s3_client.list_objects(s3_bucket, prefix=prefix + "/", recursive=True)]
    assert len(keys) == 65 and f"{prefix}/images/eval-00000.png" in keys

    with pytest.raises(errors.RunNotFinished):
        run.save_artifact(tmp_path / "early")
    lines = list(run.stream_logs(poll=0.5, timeout=120))
    assert lines[-1] == "stand-in trainer: done" and any(line.startswith("step 8/8") for line in lines)
    assert not any(line.startswith("KUBETUNE_EVENT") for line in lines)
    status = run.wait(timeout=60, poll=0.5)
    assert status.phase == "Succeeded" and status.artifact is not None
    assert run.metrics() == {"before": STANDIN_BEFORE, "after": STANDIN_AFTER}
    assert "stand-in trainer: done" in run.logs()
    assert "KUBETUNE_EVENT" in run.logs(include_events=True)

    again = kubetune.get_run("fit1", client=client)
    assert again.phase == "Succeeded" and again.summary()["after"] == STANDIN_AFTER
    assert [r.name for r in kubetune.list_runs(client=client)] == ["fit1"]
    with pytest.raises(errors.RunNotFound):
        kubetune.get_run("nope", client=client)
    with pytest.raises(errors.RunAlreadyExists):
        fit_standin(client, "fit1", s3_server, s3_bucket)

    # the stand-in publishes no files: put a real-looking artifact where the status says, with its sha256
    sha = put_fake_artifact(s3_client, status.artifact.uri)
    from kubernetes.client import CustomObjectsApi

    CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "fit1", {"status": {"artifact": {"sha256": sha}}})
    path = run.save_artifact(tmp_path / "clip-model")
    assert (path / "clip-vision" / "model.safetensors").read_bytes() == b"v" * 2000
    assert kubetune.verify_artifact(path) == []
    # tampering in the bucket is caught
    from kubetune.storage import parse_s3_uri

    bucket, key = parse_s3_uri(status.artifact.uri)
    s3_client.put_object(bucket, f"{key}/metrics.json", io.BytesIO(b"{}"), 2)
    with pytest.raises(errors.ArtifactCorrupt, match="metrics"):
        run.save_artifact(tmp_path / "clip-model-2")

    # Finetuner's other verbs: the artifact's id, the metrics table, examples refused with what to use, delete
    kubetune.login()  # needs nothing: the kubeconfig's cluster
    assert run.artifact_id == status.artifact.uri
    capsys.readouterr()
    run.display_metrics()
    shown = capsys.readouterr().out
    assert re.search(rf"R@5\b.*{STANDIN_AFTER['R@5']:.4f}", shown), shown
    with pytest.raises(errors.ConfigInvalid, match="example_results") as refused:
        run.display_examples()
    assert "write_report" in (refused.value.hint or "")
    kubetune.delete_run("fit1", client=client)
    deadline = time.monotonic() + 60  # the operator's finalizer lets it go
    while True:
        try:
            kubetune.get_run("fit1", client=client)
        except errors.RunNotFound:
            break
        assert time.monotonic() < deadline, "fit1 still exists 60 s after delete_run"
        time.sleep(0.5)


def test_cli_submit_quickstart_logs_status_list(standin_image: str, operator: Any, cluster: Any, namespace: str,
                                                s3_env: dict[str, str], s3_client: Any, s3_bucket: str) -> None:
    env = {**s3_env, "KUBECONFIG": cluster.kubeconfig, "KUBETUNE_NAMESPACE": namespace}
    runner = CliRunner()
    out = runner.invoke(app, ["submit", str(EXAMPLES / "quickstart.yaml"), "-o", "json"], env=env)
    assert out.exit_code == 0, out.output
    submitted = json.loads(out.stdout)
    assert submitted["name"] == "quickstart" and submitted["namespace"] == namespace
    run = kubetune.get_run("quickstart", namespace, client=Client(kubeconfig=cluster.kubeconfig))
    # the same file as `run --local`: its relative data paths were uploaded (256 + 64 images and two CSVs)
    assert re.search(rf"/{namespace}/quickstart/inputs/{UPLOAD_ID}/train/train\.csv$", run.spec.data.train)
    assert run.spec.data.eval and re.search(rf"/inputs/{UPLOAD_ID}/eval/eval\.csv$", run.spec.data.eval)
    inputs = f"kubetune/{namespace}/quickstart/inputs/"
    keys = sorted(o.object_name for o in s3_client.list_objects(s3_bucket, prefix=inputs, recursive=True))
    assert len(keys) == 256 + 64 + 2

    out = runner.invoke(app, ["logs", "quickstart", "-f"], env=env)
    assert out.exit_code == 0 and out.output.rstrip().endswith("stand-in trainer: done"), out.output[-500:]
    wait_for(lambda: run.status().phase == "Succeeded", 30, "Succeeded")
    out = runner.invoke(app, ["status", "quickstart", "-o", "json"], env=env)
    assert out.exit_code == 0 and json.loads(out.stdout)["status"]["phase"] == "Succeeded"
    out = runner.invoke(app, ["status", "quickstart"], env=env)
    assert out.exit_code == 0 and "Succeeded" in out.output and "recall_at_k" in out.output
    out = runner.invoke(app, ["list", "-o", "json"], env=env)
    assert [r["name"] for r in json.loads(out.stdout)] == ["quickstart"]
    out = runner.invoke(app, ["list"], env=env)
    assert "quickstart" in out.output and "Succeeded" in out.output
    assert runner.invoke(app, ["status", "absent"], env=env).exit_code == errors.EXIT_NOT_FOUND
    out = runner.invoke(app, ["cancel", "quickstart"], env=env)
    assert out.exit_code == 0 and "already Succeeded" in out.output
    out = runner.invoke(app, ["submit", str(EXAMPLES / "quickstart.yaml")], env=env)
    assert out.exit_code == errors.EXIT_USAGE and "already exists" in out.output
    assert sorted(o.object_name for o in s3_client.list_objects(s3_bucket, prefix=inputs, recursive=True)) == keys


def test_cancel_a_running_run(standin_image: str, operator: Any, client: Client, s3_server: Any, s3_bucket: str,
                              tmp_path: Path) -> None:
    run = fit_standin(client, "long", s3_server, s3_bucket, steps=400, pace=0.3)
    def steps() -> int:
        progress = run.status().progress
        return (progress.step or 0) if progress else 0

    wait_for(lambda: steps() >= 2, 90, "progress")
    assert run.cancel().startswith("cancelled")
    with pytest.raises(errors.RunFailed) as info:
        run.wait(timeout=60, poll=0.5)
    assert info.value.phase == "Cancelled" and info.value.reason == "Cancelled"
    st = run.status()
    assert st.phase == "Cancelled" and st.attempts == 1 and not st.retries and not run.spec.run_policy.suspend
    wait_for(lambda: not run._pods(), 60, "the trainer pod gone")
    assert run.status().phase == "Cancelled" and run.status().attempts == 1  # no second attempt
    with pytest.raises(errors.RunFailed):
        run.save_artifact(tmp_path / "x")
    runner = CliRunner()
    out = runner.invoke(app, ["status", "long", "-n", client.namespace, "--kubeconfig", str(client._kubeconfig)])
    assert out.exit_code == 0 and "Cancelled" in out.output
    assert run.cancel() == "already Cancelled"
    assert run.cancel(delete=True) == "deleted"
    wait_for(lambda: not kubetune.list_runs(client=client), 30, "the run deleted")


def test_logs_after_the_pods_are_gone_come_from_the_status(standin_image: str, operator: Any, client: Client,
                                                          s3_server: Any, s3_bucket: str) -> None:
    run = fit_standin(client, "gone", s3_server, s3_bucket, steps=3, pace=0.1,
                      overrides={"runPolicy": {"ttlSecondsAfterFinished": 1}})
    run.wait(timeout=90, poll=0.5)
    wait_for(lambda: not run._pods(), 60, "the pods deleted by the TTL")
    time.sleep(0.5)
    assert run.logs().splitlines()[-1] == "stand-in trainer: done"
    assert list(run.stream_logs(poll=0.5, timeout=30))[-1] == "stand-in trainer: done"


def test_cli_run_without_local_submits_and_follows(standin_image: str, operator: Any, cluster: Any,
                                                   namespace: str, s3_env: dict[str, str]) -> None:
    env = {**s3_env, "KUBECONFIG": cluster.kubeconfig, "COLUMNS": "150"}
    out = CliRunner().invoke(app, ["run", str(EXAMPLES / "quickstart.yaml"), "--name", "followed", "-n", namespace],
                             env=env)
    assert out.exit_code == 0, out.output[-2000:]
    assert "created finetunerun/followed" in out.output
    assert "stand-in trainer: done" in out.output and "recall_at_k" in out.output
    assert f"artifact: s3://kubetune/kubetune/{namespace}/followed/" in out.output


# ------------------------------------------------------------------------------------------------ name collisions
def captioned_csv(tmp_path: Path, tag: str, captions: list[str]) -> Path:
    """A CSV of ``captions``, each with an image of its own beside it, in a folder of its own."""
    folder = tmp_path / tag
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (ord(tag[0]), i, 0)).save(folder / "images" / f"{tag}-{i}.png")  # decoded first
        rows.append(f"{caption},images/{tag}-{i}.png\n")
    path = folder / "train.csv"
    path.write_text("text,image\n" + "".join(rows))
    return path


SHOES = ["a red shoe", "a red sandal"]
BOOTS = ["a blue boot", "a blue clog"]


def fit_shoes(client: Client, train: Path, s3_server: Any, bucket: str) -> kubetune.Run:
    return kubetune.fit("ViT-B-32", train_data=str(train), run_name="shoes", client=client,
                        output={"endpoint": s3_server.pod_endpoint, "bucket": bucket}, **SMALL)


def uploaded_train_csv(s3_client: Any, run: kubetune.Run) -> str:
    """The train CSV the run's spec.data.train points at, as it is in the bucket now."""
    from kubetune.storage import parse_s3_uri

    bucket, key = parse_s3_uri(run.refresh().spec.data.train)
    response = s3_client.get_object(bucket, key)
    try:
        return bytes(response.read()).decode()
    finally:
        response.close()
        response.release_conn()


def input_keys(s3_client: Any, bucket: str, namespace: str, name: str) -> list[str]:
    return sorted(o.object_name for o in s3_client.list_objects(
        bucket, prefix=f"kubetune/{namespace}/{name}/inputs/", recursive=True))


def test_fit_under_a_taken_name_is_refused_and_the_first_runs_data_is_untouched(
        crd_installed: str, client: Client, s3_server: Any, s3_bucket: str, s3_client: Any,
        tmp_path: Path) -> None:
    first = fit_shoes(client, captioned_csv(tmp_path, "a", SHOES), s3_server, s3_bucket)
    keys = input_keys(s3_client, s3_bucket, client.namespace, "shoes")
    assert len(keys) == 3, keys
    with pytest.raises(errors.RunAlreadyExists):
        fit_shoes(client, captioned_csv(tmp_path, "b", BOOTS), s3_server, s3_bucket)
    with pytest.raises(errors.ConfigInvalid, match=r"metadata\.name"):
        kubetune.fit("ViT-B-32", train_data=str(captioned_csv(tmp_path, "c", BOOTS)), run_name="Shoes",
                     client=client, output={"bucket": s3_bucket}, **SMALL)
    assert input_keys(s3_client, s3_bucket, client.namespace, "shoes") == keys  # nothing uploaded
    assert input_keys(s3_client, s3_bucket, client.namespace, "Shoes") == []
    run = kubetune.get_run("shoes", client=client)
    assert run.spec.data.train == first.spec.data.train
    text = uploaded_train_csv(s3_client, run)
    assert all(c in text for c in SHOES) and not any(c in text for c in BOOTS), text


def test_a_submission_that_loses_the_race_for_a_name_deletes_its_uploads_and_the_winners_data_is_untouched(
        crd_installed: str, client: Client, s3_server: Any, s3_bucket: str, s3_client: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    late = captioned_csv(tmp_path, "b", BOOTS)
    (late.parent / "run.yaml").write_text(json.dumps({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun", "metadata": {"name": "shoes"},
        "spec": {"model": {"name": "ViT-B-32"}, "data": {"train": "train.csv"},
                 "output": {"endpoint": s3_server.pod_endpoint, "bucket": s3_bucket},
                 "resources": {"gpus": 0, "cpu": "50m", "memory": "64Mi"}}}))
    store_for = client.store_for
    started: list[bool] = []
    winner: list[kubetune.Run] = []

    def store_where_the_name_is_taken_during_the_upload(spec: Any) -> Any:
        store = store_for(spec)
        put_file = store.put_file

        def put_file_after_the_other_submission(key: str, path: Any) -> None:
            if not started:  # the late submission found the name free; the other one takes it now
                started.append(True)
                winner.append(fit_shoes(client, captioned_csv(tmp_path, "a", SHOES), s3_server, s3_bucket))
            put_file(key, path)

        store.put_file = put_file_after_the_other_submission
        return store

    monkeypatch.setattr(client, "store_for", store_where_the_name_is_taken_during_the_upload)
    with pytest.raises(errors.RunAlreadyExists):  # the API server's 409 on create
        client.submit(late.parent / "run.yaml")
    match = re.fullmatch(rf"s3://{s3_bucket}/(kubetune/{client.namespace}/shoes/inputs/{UPLOAD_ID})/train/train\.csv",
                         winner[0].spec.data.train)
    assert match, winner[0].spec.data.train
    keys = input_keys(s3_client, s3_bucket, client.namespace, "shoes")
    assert len(keys) == 3 and all(k.startswith(match[1] + "/") for k in keys), keys  # the late uploads are gone
    text = uploaded_train_csv(s3_client, kubetune.get_run("shoes", client=client))
    assert all(c in text for c in SHOES) and not any(c in text for c in BOOTS), text
