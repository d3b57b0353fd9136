"""Experiment tracking: a real tiny training run logs to a real MLflow server and to W&B offline, and what they
hold equals what the trainer's own events reported; a down server never fails training; the spec and the
operator's manifests keep credentials out of URLs and logs."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kt_trainer_helpers import of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, Event
from kubetune.api.spec import FinetuneRunSpec
from kubetune.api.validation import validate_spec
from kubetune.operator import manifests
from kubetune.operator.settings import OperatorSettings
from kubetune_trainer import tracking

from tests.invalid_specs import BASE_SPEC, schema_errors

pytestmark = pytest.mark.unit

# Never a real key: the run must not write it anywhere.
FAKE_WANDB_KEY = "kt" + uuid.uuid4().hex * 2


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def environ_restored() -> Iterator[None]:
    """The trainer sets MLflow's client defaults in os.environ (setdefault); they stay inside each test."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _environ_per_test() -> Iterator[None]:
    with environ_restored():
        yield


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B ``.wandb`` transaction log, parsed with W&B's own protobuf schema. The framing is
    LevelDB's log format (32 KiB blocks of CRC32/length/type-headed chunks) behind W&B's 7-byte file header;
    wandb ≥ 0.19 ships no Python reader for it, and an offline run writes no wandb-summary.json."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    block, header = 32768, 7
    pos, record = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 0:  # zero padding
            continue
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def wandb_history(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], int | None]:
    """(history rows, final summary, config, exit code) of an offline run's ``.wandb`` file."""
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    exit_code = None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return rows, summary, config, exit_code


def series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in rows if key in row]


def events_series(events: list[Event]) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) series the trainer's own events report, under the tracking metric names."""
    out: dict[str, list[tuple[int, float]]] = {}
    step = 0
    for event in events:
        step = event.step if event.step is not None else step
        if event.type == "progress" and event.loss is not None:
            out.setdefault("train/loss", []).append((step, event.loss))
        elif event.type == "metrics":
            for key, value in (("train/epoch_loss", event.train_loss), ("val/loss", event.val_loss)):
                if value is not None:
                    out.setdefault(key, []).append((step, value))
        elif event.type == "evaluation" and event.stage in ("before", "epoch", "after"):
            for name, value in (event.metrics or {}).items():
                out.setdefault(tracking.metric_name(f"eval/{name}"), []).append((step, value))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def _runs_of(url: str, experiment: str, uid: str) -> list[Any]:
    client = _client(url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    return list(client.search_runs([found.experiment_id], filter_string=f"tags.`kubetune.run_uid` = '{uid}'"))


# ------------------------------------------------------------------------------------------------ one tracked run
@pytest.fixture(scope="module")
def tracked(synthetic_data: dict[str, Path], mlflow_server: str,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tracked")
    uid = str(uuid.uuid4())
    spec = tiny_spec(str(synthetic_data["train"]),
                     data={"train": str(synthetic_data["train"]), "eval": str(synthetic_data["eval"])},
                     training={"epochs": 2},
                     callbacks={"evaluation": {"limit": 10, "everyEpochs": 1},
                                "mlflow": {"trackingUri": mlflow_server, "experiment": "tracking-tests"},
                                # an explicit offline mode while a key is set: the key must not leak into it
                                "wandb": {"mode": "offline", "project": "kt-tests"}})
    config = write_run(root / "run.yaml", spec, uid=uid)
    with environ_restored(), pytest.MonkeyPatch.context() as env:
        env.setenv("KUBETUNE_RUN_UID", uid)
        env.setenv("KUBETUNE_PROGRESS_SECONDS", "0")  # a progress event per step: the events carry every loss
        env.setenv("KUBETUNE_TERMINATION_LOG", str(root / "termination-log"))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root / "wandb"))
        env.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
        code, events, raw = run_trainer(["--config", str(config), "--output-dir", str(root / "out")])
    return {"code": code, "events": events, "raw": raw, "root": root, "uid": uid, "url": mlflow_server}


def test_tracked_run_succeeds(tracked: dict[str, Any]) -> None:
    assert tracked["code"] == 0, tracked["raw"][-3000:]
    assert [e.stage for e in of_type(tracked["events"], "evaluation")] == ["before", "epoch", "after"]


def test_mlflow_holds_params_loss_metrics_and_artifact_uri(tracked: dict[str, Any]) -> None:
    (run,) = _runs_of(tracked["url"], "tracking-tests", tracked["uid"])
    client = _client(tracked["url"])
    started = of_type(tracked["events"], "started")[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == {
        "model": "kt-tiny", "weights_from": "random init", "epochs": "2", "batch_size": "32", "grad_accumulation": "1",
        "learning_rate": "0.001", "loss": "CLIPLoss", "optimizer": "adamw", "scheduler": "cosine",
        "warmup_steps": "2", "weight_decay": "0.1", "seed": "7", "lock_image": "False", "lock_text": "False",
        "run_name": "tiny", "run_namespace": "team-a", "run_uid": tracked["uid"],
        "world_size": "1", "total_steps": str(started.total_steps), "train_pairs": "256", "device": "cpu",
        "precision": "fp32"}
    (artifact,) = of_type(tracked["events"], "artifact")
    assert run.data.tags["artifact_uri"] == artifact.uri and run.data.tags["artifact_sha256"] == artifact.sha256
    expected = events_series(tracked["events"])
    assert len(expected["train/loss"]) == started.total_steps
    assert {"eval/R_at_5", "eval/reciprocal_rank", "val/loss", "train/epoch_loss"} <= set(expected)
    for key, points in expected.items():
        history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [(step, value) for step, _, value in history] == points, key
    losses = [value for _, value in expected["train/loss"]]
    third = len(losses) // 3
    assert sum(losses[-third:]) < 0.8 * sum(losses[:third]), losses  # the logged per-step loss falls
    eval_steps = [step for step, _ in expected["eval/R_at_5"]]
    assert eval_steps == [0, *eval_steps[1:-1], started.total_steps] and eval_steps == sorted(set(eval_steps))


def test_wandb_offline_run_holds_the_events_values(tracked: dict[str, Any]) -> None:
    # the run directory under WANDB_DIR, and its copy in the run's store (here the local output directory)
    (run_dir,) = (tracked["root"] / "wandb" / "wandb").glob(f"offline-run-*-{tracked['uid']}")
    copy = tracked["root"] / "out" / tracking.WANDB_STORE_PREFIX / run_dir.name / f"run-{tracked['uid']}.wandb"
    assert copy.read_bytes() == (run_dir / f"run-{tracked['uid']}.wandb").read_bytes()
    rows, summary, config, exit_code = wandb_history(copy)
    assert exit_code == 0
    for key, points in events_series(tracked["events"]).items():
        assert series(rows, key) == points, key
    (artifact,) = of_type(tracked["events"], "artifact")
    assert summary["artifact_uri"] == artifact.uri
    assert config["model"] == "kt-tiny" and config["run_uid"] == tracked["uid"]


def test_no_secret_in_logs_events_or_files(tracked: dict[str, Any]) -> None:
    assert FAKE_WANDB_KEY not in tracked["raw"]
    for path in tracked["root"].rglob("*"):
        if path.is_file():
            assert FAKE_WANDB_KEY.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------------------------ failures
def _quick_spec(train: str, **callbacks: Any) -> dict[str, Any]:
    return tiny_spec(train, training={"epochs": 1, "maxSteps": 2},
                     callbacks={"evaluation": {"enabled": False}, **callbacks})


def test_a_down_server_never_fails_training_and_warns_once(
        synthetic_data: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    config = write_run(tmp_path / "run.yaml", _quick_spec(str(synthetic_data["train"]),
                                                          mlflow={"trackingUri": down}))
    with caplog.at_level(logging.WARNING):
        code, events, raw = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert code == 0, raw[-3000:]
    assert of_type(events, "finished")
    # every warning record (open_clip's own "no pretrained weights" aside) and the libraries' direct stderr
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and "No pretrained weights" not in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("experiment tracking: MLflow start failed"), warnings
    assert "\n" not in warnings[0] and down in warnings[0]
    stderr = capfd.readouterr().err
    assert "Retrying" not in stderr and "WARNING" not in stderr, stderr[-2000:]


def test_a_server_that_asks_for_credentials_gets_them_from_the_secrets_variables(
        mlflow_auth_server: tuple[str, str, str], synthetic_data: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    url, user, password = mlflow_auth_server
    with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):  # it does ask
        _client(url).search_experiments()
    uid = str(uuid.uuid4())
    spec = _quick_spec(str(synthetic_data["train"]), mlflow={
        "trackingUri": url, "experiment": "authenticated", "credentialsSecret": {"name": "mlflow-auth"}})
    config = write_run(tmp_path / "run.yaml", spec, uid=uid)
    monkeypatch.setenv("KUBETUNE_RUN_UID", uid)
    # what the pod's optional secretKeyRefs put into the trainer's environment
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    code, events, raw = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert code == 0, raw[-3000:]
    (run,) = _runs_of(url, "authenticated", uid)
    assert run.info.status == "FINISHED"
    steps = [step for step, _ in events_series(events)["train/loss"]]
    assert [m.step for m in _client(url).get_metric_history(run.info.run_id, "train/loss")] == steps
    assert password not in raw
    for path in tmp_path.rglob("*"):
        if path.is_file() and "mlflow-auth" not in path.parts:  # the server's own user store holds its hash
            assert password.encode() not in path.read_bytes(), path


def test_a_failed_run_is_marked_failed_and_its_attempts_share_one_run(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = str(uuid.uuid4())
    spec = _quick_spec(str(tmp_path / "missing.csv"), mlflow={"trackingUri": mlflow_server, "experiment": "fails"},
                       wandb={})
    config = write_run(tmp_path / "run.yaml", spec, uid=uid)
    monkeypatch.setenv("KUBETUNE_RUN_UID", uid)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # mode auto without a key: offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    for attempt in (1, 2):
        monkeypatch.setenv("KUBETUNE_ATTEMPT", str(attempt))
        code, _, raw = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
        assert code == EXIT_BAD_DATA, raw[-3000:]
    (run,) = _runs_of(mlflow_server, "fails", uid)
    assert run.info.status == "FAILED" and run.data.tags["kubetune.run"] == "team-a/tiny"
    assert run.data.tags["kubetune.attempt"] == "2"
    assert run.data.params["run_uid"] == uid
    # W&B: each attempt's offline directory (W&B appends -1 to the second when both start within one second)
    # copied into the store, its run ended with exit code 1
    written = {d.name for d in (tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{uid}*")}
    copies = sorted((tmp_path / "out" / tracking.WANDB_STORE_PREFIX).glob(f"offline-run-*-{uid}*/run-{uid}.wandb"))
    assert len(written) == 2 and {c.parent.name for c in copies} == written
    assert all(wandb_history(copy)[3] == 1 for copy in copies)


def test_a_missing_tracking_library_is_a_config_error(synthetic_data: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does where it is not installed
    config = write_run(tmp_path / "run.yaml", _quick_spec(str(synthetic_data["train"]), wandb={}))
    code, events, raw = run_trainer(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_CONFIG, raw[-3000:]
    (failed,) = of_type(events, "failed")
    assert failed.reason == "InvalidConfig" and failed.retryable is False
    assert failed.message is not None and "spec.callbacks.wandb" in failed.message
    assert "kubetune[tracking]" in failed.message
    assert not of_type(events, "started")


def test_a_file_tracking_uri_logs_to_mlflows_file_store(tmp_path: Path) -> None:
    from kubetune.storage import LocalStore

    os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    uri = f"file:{tmp_path / 'mlruns'}"
    spec = FinetuneRunSpec.model_validate({**BASE_SPEC, "callbacks": {"mlflow": {"trackingUri": uri}}})
    identity = tracking.RunIdentity("r", "team-a", "uid-1", 1)
    tracker = tracking.start(spec, identity, tmp_path / "work", LocalStore(tmp_path / "out"))
    assert len(tracker.backends) == 1, "the MLflow backend did not start"
    tracker.train_step(1, 2.5, 0.1)
    tracker.event("evaluation", {"stage": "after", "epoch": 1, "metrics": {"R@5": 0.75}})
    tracker.close("finished")
    (run,) = _runs_of(uri, "kubetune", "uid-1")
    assert run.info.status == "FINISHED" and run.data.params["run_uid"] == "uid-1"
    assert run.data.metrics == {"train/loss": 2.5, "train/lr": 0.1, "eval/R_at_5": 0.75}


# ------------------------------------------------------------------------------------------------ spec, manifests
def test_credentials_in_the_tracking_uri_are_refused_naming_the_field() -> None:
    spec = {**BASE_SPEC, "callbacks": {"mlflow": {"trackingUri": "https://user:pw@mlflow.example:5000"}}}
    model, errors = validate_spec(spec)
    assert model is None
    assert errors == [("spec.callbacks.mlflow.trackingUri", "credentials must not be in the tracking URI")]
    assert list(schema_errors(spec)) == []  # the API server takes it; the operator fails the run (InvalidSpec)


@pytest.mark.parametrize("uri", ["http://mlflow.mlflow:5000", "https://mlflow.example/prefix", "file:/tmp/mlruns"])
def test_tracking_uris_the_spec_accepts(uri: str) -> None:
    spec = {**BASE_SPEC, "callbacks": {"mlflow": {"trackingUri": uri}, "wandb": {}}}
    model, errors = validate_spec(spec)
    assert errors == [] and model is not None
    assert model.callbacks.mlflow is not None and model.callbacks.mlflow.experiment == "kubetune"
    assert model.callbacks.wandb is not None and model.callbacks.wandb.mode == "auto"


def test_the_wandb_key_reaches_the_trainer_only_through_a_secret_key_ref() -> None:
    settings = OperatorSettings(trainer_image="kubetune/trainer:test", s3_endpoint="http://10.0.0.1:9000",
                                s3_bucket="models")
    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "team-a", "uid": "u-1", "generation": 1},
           "spec": {**BASE_SPEC, "callbacks": {"wandb": {"apiKeySecret": {"name": "wandb"}}}}}
    job = manifests.job(run, FinetuneRunSpec.model_validate(run["spec"]), settings, attempt=1)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "WANDB_API_KEY"}}}
    without = manifests.job({**run, "spec": BASE_SPEC}, FinetuneRunSpec.model_validate(BASE_SPEC), settings,
                            attempt=1)
    assert "WANDB_API_KEY" not in {e["name"] for e in without["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_mlflow_credentials_reach_the_trainer_only_through_optional_secret_key_refs() -> None:
    settings = OperatorSettings(trainer_image="kubetune/trainer:test", s3_endpoint="http://10.0.0.1:9000",
                                s3_bucket="models")
    mlflow = {"trackingUri": "https://mlflow.example", "credentialsSecret": {"name": "mlflow-auth"}}
    run = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "r", "namespace": "team-a", "uid": "u-1", "generation": 1},
           "spec": {**BASE_SPEC, "callbacks": {"mlflow": mlflow}}}
    job = manifests.job(run, FinetuneRunSpec.model_validate(run["spec"]), settings, attempt=1)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": key,
                                                                          "optional": True}}}
    assert not [e for e in env.values() if "value" in e and "mlflow-auth" in str(e["value"])]


# ------------------------------------------------------------------------------------------------ pure pieces
def test_metric_names_are_ones_mlflow_accepts() -> None:
    from mlflow.utils.validation import _validate_metric_name

    names = ["R@1", "image_to_text_R@5", "clip-text-to-clip-vision_hit_at_k", "zero_shot_top1", "mean_rank"]
    for name in names:
        _validate_metric_name(tracking.metric_name(f"eval/{name}"))
    assert tracking.metric_name("eval/R@5") == "eval/R_at_5"


@pytest.mark.parametrize(("mode", "environ", "expected"), [
    ("auto", {}, "offline"), ("auto", {"WANDB_API_KEY": ""}, "offline"), ("auto", {"WANDB_API_KEY": "k"}, "online"),
    ("offline", {"WANDB_API_KEY": "k"}, "offline"), ("online", {}, "online"),
])
def test_wandb_auto_mode_is_online_exactly_with_a_key(mode: str, environ: dict[str, str], expected: str) -> None:
    assert tracking.wandb_mode(mode, environ) == expected
