"""SDK argument handling, run files, data upload and artifact download against a local store (no cluster)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubetune.api import errors, runfile
from kubetune.api.spec import DNS_LABEL
from kubetune.sdk.callbacks import BestModelCheckpoint, EarlyStopping, EvaluationCallback, WiSEFTCallback
from kubetune.sdk.client import build_spec, generate_name, upload_dataset, validate_spec
from kubetune.storage import LocalStore, download_artifact

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


# ------------------------------------------------------------------------------------------------ import cost
def test_import_kubetune_is_cheap() -> None:
    code = ("import sys, kubetune; kubetune.ConfigInvalid; "
            "heavy = [m for m in ('torch', 'kubernetes', 'open_clip', 'minio', 'numpy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sdk_and_cli_import_neither_the_trainer_nor_the_operator() -> None:
    code = ("import sys, kubetune.sdk.client, kubetune.sdk.cli, kubetune.sdk.local; "
            "loaded = {m.split('.')[0] for m in sys.modules}; "
            "heavy = sorted(loaded & {'torch', 'open_clip', 'kubetune_trainer', 'kopf', 'pydantic_settings'}); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_lazy_names_resolve() -> None:
    import kubetune

    for name in kubetune.__all__:
        if name != "__version__":
            assert getattr(kubetune, name) is not None, name
    with pytest.raises(AttributeError):
        kubetune.no_such_thing  # noqa: B018


# ------------------------------------------------------------------------------------------------ fit → spec
def test_build_spec_maps_finetuner_arguments() -> None:
    body = build_spec("ViT-B-32", "s3://b/train.csv", "s3://b/eval.csv", pretrained="laion2b_s34b_b79k", epochs=3,
                      batch_size=32, learning_rate=1e-6, loss="SigLIPLoss", freeze=["image"], to_onnx=True, gpus=2,
                      callbacks=[EvaluationCallback(limit=10, every_epochs=1), WiSEFTCallback(alpha=0.5),
                                 EarlyStopping(patience=3), BestModelCheckpoint(monitor="R@5", mode="max")],
                      csv_options={"text_column": "caption"})
    spec = validate_spec(body)
    assert spec.model.name == "ViT-B-32" and spec.model.pretrained == "laion2b_s34b_b79k"
    assert spec.data.train == "s3://b/train.csv" and spec.data.eval == "s3://b/eval.csv"
    assert spec.data.text_column == "caption"
    assert (spec.training.epochs, spec.training.batch_size, spec.training.learning_rate) == (3, 32, 1e-6)
    assert spec.training.loss == "SigLIPLoss" and spec.training.lock_image and not spec.training.lock_text
    assert spec.export.onnx and spec.resources.gpus == 2
    assert spec.callbacks.evaluation.limit == 10 and spec.callbacks.evaluation.every_epochs == 1
    assert spec.callbacks.wise_ft is not None and spec.callbacks.wise_ft.alpha == 0.5
    assert spec.callbacks.early_stopping is not None and spec.callbacks.early_stopping.patience == 3
    assert spec.callbacks.best_model is not None and spec.callbacks.best_model.monitor == "R@5"


@pytest.mark.parametrize(("model", "name", "pretrained"), [
    ("clip-base-en", "ViT-B-32-quickgelu", "openai"),
    ("clip-large-en", "ViT-L-14-quickgelu", "openai"),
    ("clip-base-multi", "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
    ("ViT-B-16::laion2b_s34b_b88k", "ViT-B-16", "laion2b_s34b_b88k"),
    ("ViT-L-14", "ViT-L-14", None),
])
def test_model_names(model: str, name: str, pretrained: str | None) -> None:
    spec = validate_spec(build_spec(model, "s3://b/t.csv"))
    assert (spec.model.name, spec.model.pretrained) == (name, pretrained)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"epochs": 0}, "spec.training.epochs"),
    ({"learning_rate": 2.0}, "spec.training.learningRate"),
    ({"val_split": 0.2, "eval_data": "s3://b/e.csv"}, "valSplit"),
    ({"callbacks": [WiSEFTCallback(alpha=1.5)]}, "alpha"),
    ({"callbacks": [EarlyStopping()]}, "val_loss needs eval data"),
])
def test_invalid_arguments_name_the_field(kwargs: dict, needle: str) -> None:
    with pytest.raises(errors.ConfigInvalid) as info:
        validate_spec(build_spec("ViT-B-32", "s3://b/t.csv", **kwargs))
    assert needle in str(info.value)
    assert info.value.exit_code == errors.EXIT_USAGE


def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(errors.ConfigInvalid, match="train_data is required"):
        build_spec("ViT-B-32", None)
    with pytest.raises(errors.ConfigInvalid, match="freeze"):
        build_spec("ViT-B-32", "s3://b/t.csv", freeze=["both"])
    with pytest.raises(errors.ConfigInvalid, match="not a kubetune callback"):
        build_spec("ViT-B-32", "s3://b/t.csv", callbacks=[object()])  # type: ignore[list-item]


def test_generated_names_are_dns_labels() -> None:
    import re

    for model in ("ViT-B-32", "xlm-roberta-base-ViT-B-32", "hf-hub:timm/Some_Model@v2", "___"):
        name = generate_name(model)
        assert re.match(DNS_LABEL, name) and len(name) <= 63, name


def test_errors_say_what_to_do() -> None:
    for exc in (errors.RunNotFound("r", "ns"), errors.RunNotFinished("r", "Running"),
                errors.RunFailed("r", "Failed", "InvalidData", "row 3"), errors.MissingExtra("x", "trainer", "torch")):
        assert exc.hint and exc.hint in str(exc)
    assert errors.RunNotFound("r", "ns").exit_code == 3
    assert isinstance(errors.RunNotFound("r", "ns"), LookupError)


# ------------------------------------------------------------------------------------------------ run files
def test_quickstart_run_file_is_valid_and_paths_resolve_against_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    monkeypatch.chdir(tmp_path)  # from anywhere
    run = runfile.load(QUICKSTART)
    assert run.name == "quickstart" and run.base_dir == QUICKSTART.parent
    spec = runfile.resolve_local_paths(run.spec, run.base_dir)
    assert spec.data.train == str(QUICKSTART.parent / "data" / "train.csv")
    assert Path(spec.data.train).is_file() and spec.data.eval and Path(spec.data.eval).is_file()
    doc = run.document("other", "ns")
    assert doc["metadata"] == {"name": "other", "namespace": "ns", "labels": {"team": "search"}}
    assert doc["kind"] == "FinetuneRun"
    assert doc["spec"]["data"]["train"] == "data/train.csv"  # the object itself keeps the user's paths


def test_run_file_errors(tmp_path: Path) -> None:
    bad_kind = tmp_path / "a.yaml"
    bad_kind.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "spec": {}}))
    with pytest.raises(errors.ConfigInvalid, match="expected apiVersion"):
        runfile.load(bad_kind)
    missing = tmp_path / "b.yaml"
    missing.write_text(yaml.safe_dump({"spec": {"data": {"train": "nope.csv"}}}))
    run = runfile.load(missing)
    with pytest.raises(errors.ConfigInvalid, match="does not exist") as info:
        runfile.resolve_local_paths(run.spec, run.base_dir)
    assert "relative to the run file" in (info.value.hint or "")
    with pytest.raises(errors.ConfigInvalid, match="cannot read"):
        runfile.load(tmp_path / "absent.yaml")
    broken = tmp_path / "c.yaml"
    broken.write_text("spec: [unclosed")
    with pytest.raises(errors.ConfigInvalid, match="not valid YAML"):
        runfile.load(broken)
    invalid = tmp_path / "d.yaml"
    invalid.write_text(yaml.safe_dump({"spec": {"data": {"train": "x.csv"}, "training": {"epochs": -1}}}))
    with pytest.raises(errors.ConfigInvalid, match=r"spec\.training\.epochs"):
        runfile.load(invalid)


# ------------------------------------------------------------------------------------------------ upload
def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,image\n" + "".join(f"{t},{i}\n" for t, i in rows))
    return path


def test_upload_keeps_relative_images_and_rewrites_absolute_ones(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(b"A")
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"B")
    csv_path = _csv(data / "train.csv", [("a", "img/a.png"), ("a again", "img/a.png"), ("b", str(elsewhere)),
                                         ("remote", "s3://other/c.png")])
    store = LocalStore(tmp_path / "bucket")
    uri = upload_dataset(store, "inputs/train", csv_path)
    assert uri == str(tmp_path / "bucket" / "inputs" / "train" / "train.csv")
    keys = store.list("inputs")
    assert "inputs/train/img/a.png" in keys
    rewritten = [k for k in keys if k.startswith("inputs/train/files/")]
    assert len(rewritten) == 1 and store.get_bytes(rewritten[0]) == b"B"
    text = store.get_bytes("inputs/train/train.csv").decode()
    assert "img/a.png" in text and str(elsewhere) not in text and "s3://other/c.png" in text
    assert rewritten[0].removeprefix("inputs/train/") in text


def test_upload_unchanged_csv_is_copied_verbatim(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"X")
    csv_path = _csv(tmp_path / "t.csv", [("x", "x.png")])
    store = LocalStore(tmp_path / "bucket")
    upload_dataset(store, "p", csv_path)
    assert store.get_bytes("p/t.csv") == csv_path.read_bytes()


def test_upload_missing_image_fails(tmp_path: Path) -> None:
    csv_path = _csv(tmp_path / "t.csv", [("x", "missing.png")])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        upload_dataset(LocalStore(tmp_path / "bucket"), "p", csv_path)


def test_upload_doclist_file_as_is(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    path.write_bytes(b"\x00protobuf")
    store = LocalStore(tmp_path / "bucket")
    uri = upload_dataset(store, "p", path)
    assert uri.endswith("p/train.bin") and store.get_bytes("p/train.bin") == b"\x00protobuf"


# ------------------------------------------------------------------------------------------------ download
def _fake_artifact(store_root: Path) -> str:
    files = {"clip-text/model.safetensors": b"text-weights", "clip-vision/model.safetensors": b"vision",
             "metrics.json": b"{}"}
    for rel, data in files.items():
        (store_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (store_root / rel).write_bytes(data)
    manifest = {"format": "kubetune-artifact/v1", "files": {
        rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}}
    raw = json.dumps(manifest).encode()
    (store_root / "manifest.json").write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def test_download_verifies_every_file(tmp_path: Path) -> None:
    source = tmp_path / "s3"
    sha = _fake_artifact(source)
    out = download_artifact(LocalStore(source), tmp_path / "model", sha, "s3://b/a")
    assert (out / "clip-text" / "model.safetensors").read_bytes() == b"text-weights"
    from kubetune.sdk.models import verify_artifact

    assert verify_artifact(out) == []
    # downloading again replaces the earlier copy
    assert download_artifact(LocalStore(source), out, sha, "s3://b/a") == out


def test_download_detects_corruption_and_missing_files(tmp_path: Path) -> None:
    source = tmp_path / "s3"
    sha = _fake_artifact(source)
    with pytest.raises(errors.ArtifactCorrupt, match="status"):
        download_artifact(LocalStore(source), tmp_path / "m1", "f" * 64, "s3://b/a")
    (source / "metrics.json").write_bytes(b"{'tampered': 1}")
    with pytest.raises(errors.ArtifactCorrupt, match=r"metrics\.json"):
        download_artifact(LocalStore(source), tmp_path / "m2", sha, "s3://b/a")
    (source / "metrics.json").unlink()
    with pytest.raises(errors.ArtifactMissing, match=r"metrics\.json"):
        download_artifact(LocalStore(source), tmp_path / "m3", sha, "s3://b/a")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()  # nothing half-written
    with pytest.raises(errors.ArtifactMissing, match=r"manifest\.json"):
        download_artifact(LocalStore(tmp_path / "empty"), tmp_path / "m4", None, "s3://b/x")


def test_download_refuses_a_non_empty_foreign_directory(tmp_path: Path) -> None:
    source = tmp_path / "s3"
    sha = _fake_artifact(source)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(errors.ConfigInvalid, match="not empty"):
        download_artifact(LocalStore(source), tmp_path / "busy", sha, "s3://b/a")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_fit_turns_a_doclist_into_a_protobuf_file_the_trainer_reads(tmp_path: Path) -> None:
    from docarray import BaseDoc, DocList
    from kubetune.sdk.client import _materialise

    class PairDoc(BaseDoc):
        text: str
        image: str

    docs = DocList[PairDoc]([PairDoc(text="a red circle", image="s3://b/1.png")])
    path = _materialise(docs, tmp_path, "train")
    assert path == str(tmp_path / "train.bin")
    from kubetune_trainer.data import read_doclist

    (doc,) = read_doclist(Path(path).read_bytes(), "train")
    assert doc["text"] == "a red circle" and doc["image"] == "s3://b/1.png"
    assert _materialise("s3://b/t.csv", tmp_path, "eval") == "s3://b/t.csv"
    assert _materialise(None, tmp_path, "eval") is None
    with pytest.raises(errors.ConfigInvalid, match="DocList"):
        _materialise(42, tmp_path, "query")
