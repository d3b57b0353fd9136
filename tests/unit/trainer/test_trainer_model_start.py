"""What a run's model starts from: pretrained weights staged into a model mirror on a real S3 server (read with
the hub off), an unreachable hub failing fast, and continuing from a kubetune artifact."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_BAD_CONFIG, parse_line
from kubetune.api.spec import ModelSpec
from kubetune.lifecycle.fold import StatusFolder
from kubetune.sdk.staging import stage_model
from kubetune.storage import Store, s3_store
from kubetune_trainer import export
from kubetune_trainer import model as model_lib
from safetensors.torch import save_file

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")
WIDE_CONFIG: dict[str, Any] = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "width": 96}}


def _credentials(s3_server: Any) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "AWS_ENDPOINT_URL": s3_server.host_endpoint}


def _saved_tiny(path: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = model_lib.build(ModelSpec(name=name, config=copy.deepcopy(TINY_CONFIG), pretrained="random"), CPU,
                            "fp32", path.parent / "build").model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the socket is: connections are refused at once


def _trainer_process(root: Path, spec: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The trainer as a pod runs it: its own process, with its own environment (the hub's settings are read
    when huggingface_hub is imported, so they cannot change inside this test process)."""
    config = write_run(root / "run.yaml", spec)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "KUBETUNE_"))}
    full.update({"KUBETUNE_TERMINATION_LOG": str(root / "termination-log"), "HF_HOME": str(root / "hf"), **env})
    return subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config),
                           "--output-dir", str(root / "out"), "--work-dir", str(root / "work")],
                          capture_output=True, text=True, env=full, timeout=300)


def _failed(out: str) -> Any:
    failed = [e for e in (parse_line(line) for line in out.splitlines()) if e is not None and e.type == "failed"]
    assert len(failed) == 1, out[-3000:]
    return failed[0]


# ------------------------------------------------------------------------------------------------ the mirror
def test_staged_weights_load_from_the_mirror_sha256_checked(tmp_path: Path, s3_server: Any, s3_bucket: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _credentials(s3_server).items():
        monkeypatch.setenv(key, value)
    saved = _saved_tiny(tmp_path / "kt-v1.safetensors", "kt-tiny-mirror", seed=11)
    dest = f"s3://{s3_bucket}/mirror"
    staged = stage_model("kt-tiny-mirror::kt-v1", dest, tmp_path / "kt-v1.safetensors",
                         endpoint=s3_server.host_endpoint)
    entry = f"{dest}/kt-tiny-mirror/kt-v1"
    assert staged["uri"] == entry and staged["file"] == f"{entry}/kt-v1.safetensors"
    mirror: Store = s3_store(s3_server.host_endpoint, dest)
    assert mirror.list() == ["kt-tiny-mirror/kt-v1/kt-v1.safetensors", "kt-tiny-mirror/kt-v1/manifest.json"]
    listed = json.loads(mirror.get_bytes("kt-tiny-mirror/kt-v1/manifest.json"))["files"]
    assert listed == {"kt-v1.safetensors": {"sha256": staged["sha256"], "size": staged["size"]}}

    torch.manual_seed(99)  # a random init would differ from the staged weights
    spec = ModelSpec(name="kt-tiny-mirror", config=copy.deepcopy(TINY_CONFIG), pretrained="kt-v1")
    bundle = model_lib.build(spec, CPU, "fp32", tmp_path / "work", mirror=mirror)
    loaded = bundle.model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert bundle.start == {"name": "kt-tiny-mirror", "pretrained": "kt-v1", "from": staged["file"],
                            "sha256": staged["sha256"], "mirror": dest}

    # a mirror file changed after staging is refused, not loaded
    mirror.put_bytes("kt-tiny-mirror/kt-v1/kt-v1.safetensors", b"tampered")
    with pytest.raises(model_lib.ModelError, match=r"sha256 or size differs from the manifest.*stage it again"):
        model_lib.build(spec, CPU, "fp32", tmp_path / "work2", mirror=mirror)


def test_a_run_reads_the_mirror_its_environment_names_with_the_hub_off(tmp_path: Path, s3_server: Any,
                                                                       s3_bucket: str,
                                                                       synthetic_data: dict[str, Path]) -> None:
    _saved_tiny(tmp_path / "weights.safetensors", "kt-tiny-mirror-run", seed=5)
    dest = f"s3://{s3_bucket}/models"
    staged = stage_model("kt-tiny-mirror-run::kt-v2", dest, tmp_path / "weights.safetensors",
                         store=s3_store(s3_server.host_endpoint, dest, env=_credentials(s3_server)))
    spec = tiny_spec(str(synthetic_data["train"]), model={"name": "kt-tiny-mirror-run", "pretrained": "kt-v2"},
                     data={"train": str(synthetic_data["train"]), "eval": str(synthetic_data["eval"])},
                     training={"epochs": 1, "maxSteps": 2}, callbacks={"evaluation": {"limit": 5}})
    done = _trainer_process(tmp_path, spec, {**_credentials(s3_server), "KUBETUNE_MODEL_MIRROR": dest,
                                             "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metadata = json.loads((tmp_path / "out" / "artifact" / "metadata.json").read_text())
    assert metadata["start"] == {"name": "kt-tiny-mirror-run", "pretrained": "kt-v2", "from": staged["file"],
                                 "sha256": staged["sha256"], "mirror": dest}
    folder = StatusFolder()  # what the run's status says, through the operator's own fold
    for line in done.stdout.splitlines():
        folder.feed_line(line)
    assert folder.status["startedFrom"] == {"model": "kt-tiny-mirror-run", "pretrained": "kt-v2",
                                            "source": staged["file"]}

    # the report rebuilds the starting model from the mirror the artifact names, with the hub unreachable and no
    # KUBETUNE_MODEL_MIRROR on this side
    report = tmp_path / "report.html"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "KUBETUNE_"))}
    env.update({**_credentials(s3_server), "KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint, "HF_HUB_OFFLINE": "1",
                "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf-report")})
    shown = subprocess.run([sys.executable, "-m", "kubetune.sdk.cli", "report", str(tmp_path / "out" / "artifact"),
                            "--out", str(report)], capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, (shown.stdout + shown.stderr)[-3000:]
    assert "ranks differently" not in report.read_text()  # the rebuilt start is the run's own


@pytest.mark.parametrize("with_mirror", [True, False], ids=["mirror-without-the-tag", "no-mirror"])
def test_an_unreachable_hub_fails_at_once_naming_the_mirror_and_the_hub(tmp_path: Path, s3_server: Any,
                                                                        s3_bucket: str, with_mirror: bool,
                                                                        synthetic_data: dict[str, Path]) -> None:
    hub = f"http://127.0.0.1:{_closed_port()}"
    env = {**_credentials(s3_server), "HF_ENDPOINT": hub}
    if with_mirror:
        env["KUBETUNE_MODEL_MIRROR"] = f"s3://{s3_bucket}/mirror"
    spec = tiny_spec(str(synthetic_data["train"]), model={"name": "ViT-B-32", "config": None})  # its default tag
    done = _trainer_process(tmp_path, spec, env)
    assert done.returncode == EXIT_BAD_CONFIG, (done.stdout + done.stderr)[-3000:]
    failed = _failed(done.stdout)
    assert failed.reason == "InvalidModel" and failed.retryable is False
    message = failed.message or ""
    assert "ViT-B-32::laion2b_s34b_b79k" in message and f"the hub {hub} is unreachable" in message
    if with_mirror:
        assert f"the model mirror s3://{s3_bucket}/mirror has no ViT-B-32/laion2b_s34b_b79k/manifest.json" in message
    else:
        assert "no model mirror is configured" in message
    assert "Retrying" not in done.stderr  # one probe, not huggingface_hub's half a minute of retries per file


# ------------------------------------------------------------------------------------------------ artifacts
@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, synthetic_data: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("artifact")
    spec = tiny_spec(str(synthetic_data["train"]), model={"name": "kt-tiny-art"},
                     training={"epochs": 1, "maxSteps": 2}, callbacks={"evaluation": {"enabled": False}})
    code, _, raw = run_trainer(["--config", str(write_run(root / "run.yaml", spec)), "--output-dir", str(root)])
    assert code == 0, raw[-3000:]
    return root / "artifact"


def test_an_artifact_alone_brings_its_model_name_and_config(artifact: Path, tmp_path: Path) -> None:
    spec = ModelSpec(weights=str(artifact))  # neither name nor config
    torch.manual_seed(99)
    bundle = model_lib.build(spec, CPU, "fp32", tmp_path, weights_path=artifact)
    assert bundle.name == "kt-tiny-art" and bundle.config["vision_cfg"] == TINY_CONFIG["vision_cfg"]
    assert bundle.start == {"name": "kt-tiny-art", "pretrained": None, "weights": str(artifact)}
    trained = export.load_artifact_state_dict(artifact)
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k].reshape(v.shape), v) for k, v in trained.items())


def test_an_artifact_that_does_not_fit_the_named_model_is_one_sentence(artifact: Path, tmp_path: Path,
                                                                       synthetic_data: dict[str, Path]) -> None:
    spec = tiny_spec(str(synthetic_data["train"]),
                     model={"name": "kt-tiny-wide", "config": WIDE_CONFIG, "weights": str(artifact)})
    code, events, raw = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_CONFIG, raw[-3000:]
    (failed,) = of_type(events, "failed")
    assert failed.reason == "InvalidModel" and failed.retryable is False
    message = failed.message or ""
    assert "holds a kt-tiny-art (embed_dim 32, vision 2×64 patch 8 at 32 px, text 2×32)" in message
    assert "does not fit spec.model's kt-tiny-wide (embed_dim 32, vision 2×96 patch 8 at 32 px, text 2×32)" in message
    assert "leave spec.model.name and config unset" in message and "\n" not in message
    assert "size mismatch" not in raw


def test_an_artifact_whose_tensors_fit_a_differently_configured_model_is_one_sentence(
        artifact: Path, tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), model={
        "name": "kt-tiny-quickgelu", "config": {**TINY_CONFIG, "quick_gelu": True}, "weights": str(artifact)})
    code, events, raw = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_CONFIG, raw[-3000:]
    (failed,) = of_type(events, "failed")
    message = failed.message or ""
    assert failed.reason == "InvalidModel" and "\n" not in message
    assert "holds a kt-tiny-art whose tensors fit spec.model's kt-tiny-quickgelu" in message
    assert "differs in quick_gelu (None in the artifact, True here)" in message
    # the same config under another name is the same function: it loads
    same = tiny_spec(str(synthetic_data["train"]), training={"epochs": 1, "maxSteps": 1},
                     callbacks={"evaluation": {"enabled": False}},
                     model={"name": "kt-tiny-renamed", "config": TINY_CONFIG, "weights": str(artifact)})
    code, _, raw = run_trainer(["--config", str(write_run(tmp_path / "same.yaml", same)),
                                "--output-dir", str(tmp_path / "out-same")])
    assert code == 0, raw[-3000:]


def test_a_weights_file_that_does_not_fit_is_summarised(tmp_path: Path) -> None:
    _saved_tiny(tmp_path / "tiny.safetensors", "kt-tiny-file", seed=1)
    spec = ModelSpec(name="kt-tiny-wide-file", config=copy.deepcopy(WIDE_CONFIG),
                     weights=str(tmp_path / "tiny.safetensors"))
    with pytest.raises(model_lib.ModelError) as raised:
        model_lib.build(spec, CPU, "fp32", tmp_path / "work", weights_path=tmp_path / "tiny.safetensors")
    message = str(raised.value)
    assert "do not fit spec.model's kt-tiny-wide-file (embed_dim 32, vision 2×96" in message
    assert "tensors differ in shape, e.g. " in message and "in the weights" in message and "\n" not in message
