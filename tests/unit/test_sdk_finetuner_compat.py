"""Finetuner code with one import changed: the guides' call shapes through ``fit`` against a fake Kubernetes API and a
local bucket, DocumentArrays written as the trainer's own reader reads them back, Finetuner's status dict and metric
names, its callbacks and arguments (mapped, or refused with what to write instead), and ``encode`` filling
embeddings on a real tiny artifact."""

from __future__ import annotations

import base64
import copy
import csv
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubetune as finetuner
import numpy as np
import pytest
from kubetune import Document, DocumentArray
from kubetune.api import errors
from kubetune.api.events import format_event
from kubetune.api.spec import MAX_METRICS, DataSpec
from kubetune.callback import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    MLflowLogger,
    WandBLogger,
    WiSEFTCallback,
)
from kubetune.lifecycle.fold import StatusFolder
from kubetune.sdk.client import Client, build_spec, validate_spec
from kubetune.sdk.documents import labelled_pairs, write_pairs_csv
from kubetune.storage import LocalStore
from PIL import Image

from tests.unit.conftest import FakeRuns

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
FINETUNER_PREFIX = "clip-text-to-clip-vision_"


# ------------------------------------------------------------------------------------------------ fixtures


def picture(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (24, 16)) -> bytes:
    """A small real image file's bytes: a colour with a darker stripe (so that orientation matters)."""
    pixels = np.full((size[1], size[0], 3), color, dtype=np.uint8)
    pixels[: size[1] // 3] //= 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "shop"
    folder.mkdir()
    out = {}
    for name, color, fmt in (("red.jpg", (200, 30, 30), "JPEG"), ("blue.png", (30, 30, 200), "PNG"),
                             ("green.jpg", (30, 180, 30), "JPEG"), ("grey.png", (120, 120, 120), "PNG")):
        out[name] = folder / name
        out[name].write_bytes(picture(color, fmt))
    return out


def fashion(images: dict[str, Path]) -> DocumentArray:
    """Finetuner's CLIP training shape (a parent with an image chunk and a text chunk), several captions for one
    image, a flat document, and images by path, blob, tensor and data: URI."""
    grey = images["grey.png"].read_bytes()
    return DocumentArray([
        Document(chunks=[Document(uri=str(images["red.jpg"]), modality="image"),
                         Document(content="ein rotes Kleid, knielang", modality="text")]),
        Document(chunks=[Document(uri=f"file://{images['blue.png']}", modality="image"),
                         Document(text="a blue shirt", modality="text"),
                         Document(text='a "navy" shirt, slim fit\nlong sleeves', modality="text")]),
        Document(text="green trousers", uri=str(images["green.jpg"])).load_uri_to_blob(),
        Document(chunks=[Document(tensor=decoded(grey)), Document(text="a grey scarf")]),
        Document(chunks=[Document(uri="data:image/png;base64," + base64.b64encode(grey).decode()),
                         Document(text="a grey wool scarf")]),
    ])


FASHION_ROWS = [  # (text, the image file its pixels come from)
    ("ein rotes Kleid, knielang", "red.jpg"), ("a blue shirt", "blue.png"),
    ('a "navy" shirt, slim fit\nlong sleeves', "blue.png"), ("green trousers", "green.jpg"),
    ("a grey scarf", "grey.png"), ("a grey wool scarf", "grey.png")]


def read_back(uri: str, tmp_path: Path, **data: Any) -> Any:
    """The set as the trainer loads it (its own reader, its own checks)."""
    from kubetune_trainer.data import Fetcher, load_set

    spec = DataSpec(train=uri, **data)
    return load_set("train", uri, spec, Fetcher(tmp_path / "fetch-cache"), workers=2)


def spec_of(api: FakeRuns, name: str) -> dict[str, Any]:
    return copy.deepcopy(api.objects[("team", name)]["spec"])


# ------------------------------------------------------------------------------------------------ imports
def test_finetuner_names_import_neither_torch_docarray_kopf_nor_pydantic_settings() -> None:
    code = ("import sys; import kubetune as finetuner; from kubetune import DocumentArray, Document; "
            "from kubetune.callback import EvaluationCallback, WandBLogger, WiSEFTCallback; "
            "finetuner.fit, finetuner.encode, finetuner.get_model, finetuner.callback.MLflowLogger; "
            "loaded = {m.split('.')[0] for m in sys.modules}; "
            "heavy = sorted(loaded & {'torch', 'docarray', 'kopf', 'pydantic_settings', 'open_clip', "
            "'kubetune_trainer', 'PIL'}); print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------ the guides' fit calls
def test_clip_guide_fit_with_documentarrays_creates_the_run_and_uploads_what_the_trainer_reads(
        client: Client, api: FakeRuns, images: dict[str, Path], tmp_path: Path) -> None:
    train = fashion(images)
    queries = DocumentArray([Document(text="a blue shirt", tags={"finetuner_label": "shirt"}),
                             Document(text="red dress", tags={"finetuner_label": "dress"})])
    index = DocumentArray([Document(uri=str(images["blue.png"]), tags={"finetuner_label": "shirt"}),
                           Document(uri=str(images["red.jpg"]), tags={"finetuner_label": "dress"}),
                           Document(uri=str(images["grey.png"]), tags={"finetuner_label": "scarf"})])
    run = finetuner.fit(
        model='clip-base-en',
        train_data=train,
        eval_data=train,
        epochs=5,
        learning_rate=1e-7,
        loss='CLIPLoss',
        device='cuda',
        callbacks=[
            EvaluationCallback(
                model='clip-text',
                index_model='clip-vision',
                query_data=queries,
                index_data=index,
            )
        ],
        run_name="fashion", client=client,
    )
    spec = run.spec
    assert (spec.model.name, spec.model.pretrained) == ("ViT-B-32-quickgelu", "openai")
    assert (spec.training.epochs, spec.training.learning_rate, spec.training.loss) == (5, 1e-7, "CLIPLoss")
    assert spec.resources.gpus == 1 and spec.callbacks.evaluation.enabled
    assert spec.data.eval == spec.data.train  # the same DocumentArray is written and uploaded once
    loaded = read_back(spec.data.train, tmp_path)
    assert [(p.text, p.row) for p in loaded.pairs] == [(t, i) for i, (t, _) in enumerate(FASHION_ROWS, 1)]
    for pair, (_, source) in zip(loaded.pairs, FASHION_ROWS, strict=True):
        assert np.array_equal(np.asarray(pair.image.open()), decoded(images[source].read_bytes())), pair.row
    assert len({p.image.key for p in loaded.pairs}) == 4  # one file per distinct image, however many captions

    queries_read, index_read = read_back(spec.data.query, tmp_path), read_back(spec.data.index, tmp_path)
    from kubetune_trainer.evaluate import RetrievalTask

    task = RetrievalTask.build(queries_read.keyed(), index_read.keyed())
    pixels = [decoded(Path(key).read_bytes()).mean(axis=(0, 1)).argmax() for key in task.index_keys]
    relevant = [[int(pixels[i]) for i in ids] for ids in task.relevant]
    assert relevant == [[2], [0]]  # the shirt query finds the blue image only, the dress query the red one


def test_multilingual_guide_fit_with_wandb_logger(client: Client, api: FakeRuns, images: dict[str, Path]) -> None:
    train = fashion(images)
    run = finetuner.fit(
        model='clip-base-multi',
        train_data=train,
        epochs=5,
        learning_rate=1e-6,
        loss='CLIPLoss',
        device='cuda',
        callbacks=[
            EvaluationCallback(
                query_data=train,
                index_data=train,
                model='clip-text',
                index_model='clip-vision'
            ),
            WandBLogger(),
        ],
        client=client, run_name="mclip",
    )
    spec = spec_of(api, "mclip")
    assert spec["model"] == {"name": "xlm-roberta-base-ViT-B-32", "pretrained": "laion5b_s13b_b90k"}
    assert spec["callbacks"]["wandb"] == {"mode": "auto"}
    assert spec["data"]["query"] == spec["data"]["index"] == spec["data"]["train"]
    assert run.spec.callbacks.wandb is not None and run.spec.callbacks.wandb.mode == "auto"


def test_wise_ft_guide_callback(client: Client, api: FakeRuns, images: dict[str, Path]) -> None:
    finetuner.fit(model="clip-base-en", train_data=fashion(images), callbacks=[WiSEFTCallback(alpha=0.5)],
                  client=client, run_name="wise")
    assert spec_of(api, "wise")["callbacks"]["wiseFt"]["alpha"] == 0.5


def test_jina_cloud_data_is_refused_with_what_to_pass_instead(client: Client, api: FakeRuns,
                                                              bucket: LocalStore) -> None:
    with pytest.raises(errors.ConfigInvalid, match="Jina AI Cloud") as pulled:
        DocumentArray.pull('finetuner/fashion-train-data-clip', show_progress=True)
    with pytest.raises(errors.ConfigInvalid, match="Jina AI Cloud") as named:
        finetuner.fit(model="clip-base-en", train_data="finetuner/fashion-train-data-clip", client=client)
    for info in (pulled, named):
        assert info.value.hint and "CSV" in info.value.hint and "s3://" in info.value.hint
        assert "DocumentArray" in info.value.hint
    assert api.calls == [] and bucket.list() == []


# ------------------------------------------------------------------------------------ documents → training file
def test_documentarray_rows_keep_texts_and_columns_as_the_trainer_reads_them(images: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    path = write_pairs_csv(fashion(images), tmp_path / "out", "train", text_column="caption", image_column="url")
    loaded = read_back(str(path), tmp_path, text_column="caption", image_column="url")
    assert loaded.texts() == [t for t, _ in FASHION_ROWS]
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == ["caption", "url"]
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2  # the blob and the grey tensor/data: image


def test_remote_image_uris_are_kept_as_references(tmp_path: Path) -> None:
    docs = DocumentArray([Document(text="a cat", uri="https://example.com/cat.jpg"),
                          Document(text="a dog", uri="s3://pets/dog.png")])
    with write_pairs_csv(docs, tmp_path, "train").open(newline="") as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == ["https://example.com/cat.jpg",
                                                                   "s3://pets/dog.png"]


@pytest.mark.parametrize(("doc", "needle"), [
    (Document(chunks=[Document(text="a red dress")]), r"train_data\[1\]: no image"),
    (Document(chunks=[Document(uri="red.jpg", modality="image")]), r"train_data\[1\]: no text"),
    (Document(text="   ", uri="red.jpg"), r"train_data\[1\]: no text"),
    (Document(chunks=[Document(uri="red.jpg"), Document(uri="blue.png"), Document(text="two")]),
     r"train_data\[1\]: 2 images"),
    (Document(text="gone", uri="no-such-image.jpg"), r"train_data\[1\]: image no-such-image.jpg not found"),
    (Document(text="bytes", blob=b"not an image"), r"train_data\[1\]: the image bytes are not"),
    (Document(text="flat", tensor=np.zeros((2, 2, 2, 3), dtype=np.uint8)), r"train_data\[1\]: tensor of shape"),
])
def test_a_document_without_a_usable_pair_is_named_by_its_index(doc: Document, needle: str,
                                                                images: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(images["red.jpg"].parent)
    docs = DocumentArray([Document(text="fine", uri="red.jpg"), doc])
    with pytest.raises(errors.ConfigInvalid, match=needle):
        write_pairs_csv(docs, tmp_path / "out", "train")


def test_a_bad_document_fails_fit_before_anything_is_uploaded_or_created(client: Client, api: FakeRuns,
                                                                        bucket: LocalStore) -> None:
    with pytest.raises(errors.ConfigInvalid, match=r"query_data\[0\]: no image"):
        finetuner.fit(model="clip-base-en", train_data=DocumentArray([Document(text="a", uri="https://x/a.jpg")]),
                      callbacks=[EvaluationCallback(query_data=DocumentArray([Document(text="no image")]))],
                      client=client)
    assert api.calls == [] and bucket.list() == []


def test_labelled_queries_need_a_labelled_image_for_each(images: dict[str, Path]) -> None:
    queries = DocumentArray([Document(text="a hat", tags={"finetuner_label": "hat"})])
    index = DocumentArray([Document(uri=str(images["red.jpg"]), tags={"finetuner_label": "dress"})])
    with pytest.raises(errors.ConfigInvalid, match=r"query_data\[0\]: no index_data image has finetuner_label 'hat'"):
        labelled_pairs(queries, index)
    with pytest.raises(errors.ConfigInvalid, match="index_data must be a DocumentArray"):
        labelled_pairs(queries, "s3://b/index.csv")
    pairs = DocumentArray([Document(text="a dress", uri=str(images["red.jpg"]))])
    assert labelled_pairs(pairs, index) == (pairs, index)  # (text, image) pairs are kubetune's own shape


def test_docarray_v2_doclists_are_still_uploaded_as_protobuf(client: Client, api: FakeRuns, images: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from docarray import BaseDoc, DocList

    class Pair(BaseDoc):
        text: str
        blob: bytes

    docs = DocList[Pair]([Pair(text="a red dress", blob=images["red.jpg"].read_bytes())])
    run = finetuner.fit("ViT-B-32", train_data=docs, client=client, run_name="v2", device="cpu")
    assert run.spec.data.train.endswith("/train.bin") and run.spec.resources.gpus == 0
    assert read_back(run.spec.data.train, tmp_path).texts() == ["a red dress"]


# ------------------------------------------------------------------------------------------------ callbacks
@pytest.mark.parametrize(("model", "index_model"), [("clip-vision", "clip-text"), ("clip-text", None),
                                                    ("clip-text", "clip-text"), (None, "clip-vision")])
def test_evaluation_of_other_tower_pairs_is_refused_saying_what_kubetune_evaluates(model: str | None,
                                                                                  index_model: str | None) -> None:
    with pytest.raises(errors.ConfigInvalid, match="text → image") as info:
        EvaluationCallback(model=model, index_model=index_model)
    assert info.value.hint and "model='clip-text', index_model='clip-vision'" in info.value.hint


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: EvaluationCallback(gather_examples=True), "gather_examples"),
    (lambda: EarlyStopping(baseline=1.5), "baseline"),
    (lambda: EarlyStopping(mode="best"), "mode"),
    (lambda: WandBLogger(api_key="secret-key"), "api_key"),
    (lambda: WandBLogger(wandb_args={"tags": ["x"]}), "wandb_args"),
    (lambda: WandBLogger(mode="cloud"), "mode"),
    (lambda: WandBLogger(api_key_secret={"nme": "wandb"}), "api_key_secret"),
    (lambda: MLflowLogger(""), "tracking_uri"),
])
def test_callback_arguments_kubetune_cannot_honour_are_refused_with_a_hint(make: Any, needle: str) -> None:
    with pytest.raises(errors.ConfigInvalid, match=needle):
        make()


def test_callbacks_fill_the_spec_with_finetuners_arguments() -> None:
    callbacks = [EvaluationCallback(model="clip-text", index_model="clip-vision", batch_size=8, limit=10,
                                    distance="euclidean", exclude_self=True),
                 EarlyStopping(monitor="train_loss", patience=3, min_delta=0.1, verbose=True),
                 BestModelCheckpoint(monitor="clip-text-to-clip-vision_average_precision"),
                 WandBLogger(project="shoes", entity="team", run_name="first", mode="offline",
                             api_key_secret="wandb-creds"),
                 MLflowLogger("http://mlflow.mlflow:5000", run_name="first")]
    body = build_spec("clip-base-en", "s3://b/train.csv", val_split=0.1, callbacks=callbacks)
    assert body["callbacks"] == {
        "evaluation": {"enabled": True, "limit": 10, "distance": "euclidean", "everyEpochs": 0, "batchSize": 8},
        "earlyStopping": {"monitor": "train_loss", "mode": "min", "patience": 3, "minDelta": 0.1},
        "bestModel": {"monitor": "clip-text-to-clip-vision_average_precision", "mode": "max"},
        "wandb": {"mode": "offline", "project": "shoes", "entity": "team", "runName": "first",
                  "apiKeySecret": {"name": "wandb-creds", "key": "WANDB_API_KEY"}},
        "mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "experiment": "kubetune", "runName": "first"},
    }
    spec = validate_spec(body)
    assert spec.callbacks.wandb is not None and spec.callbacks.wandb.api_key_secret is not None
    assert spec.callbacks.wandb.api_key_secret.name == "wandb-creds"
    assert spec.callbacks.mlflow is not None and spec.callbacks.mlflow.experiment == "kubetune"
    assert WandBLogger(experiment="shoes", api_key_secret={"name": "w", "key": "KEY"}).project == "shoes"


@pytest.mark.parametrize(("monitor", "mode"), [("val_loss", "min"), ("train_loss", "min"), ("mean_rank", "min"),
                                               ("image_to_text_median_rank", "min"), ("R@5", "max"),
                                               ("reciprocal_rank", "max"), ("ndcg_at_k", "max")])
def test_auto_mode_minimises_losses_and_ranks_and_maximises_scores(monitor: str, mode: str) -> None:
    assert EarlyStopping(monitor=monitor).mode == mode
    assert BestModelCheckpoint(monitor=monitor, mode="auto").mode == mode


# ------------------------------------------------------------------------------------------------ fit's arguments
@pytest.mark.parametrize(("kwargs", "path", "value"), [
    ({"device": "cpu"}, "resources.gpus", 0),
    ({"device": "cuda"}, "resources.gpus", 1),
    ({"device": "cuda", "gpus": 2}, "resources.gpus", 2),
    ({"device": "auto"}, "resources.gpus", 1),
    ({"gpus": 0}, "resources.gpus", 0),
    ({"cpu": True}, "resources.gpus", 0),
    ({"cpu": "2"}, "resources.cpu", "2"),
    ({"optimizer": "Adam"}, "training.optimizer", "adam"),
    ({"optimizer": "AdamW", "optimizer_options": {"weight_decay": 0.01}}, "training.weightDecay", 0.01),
    ({"scheduler": "constant_with_warmup", "scheduler_options": {"num_warmup_steps": 10}}, "training.warmupSteps",
     10),
    ({"scheduler": "constant_with_warmup"}, "training.scheduler", "constant"),
    ({"model_artifact": "s3://b/kubetune/team/old/artifact"}, "model", {
        "name": "ViT-B-32-quickgelu", "weights": "s3://b/kubetune/team/old/artifact"}),
    ({"batch_size": None, "learning_rate": None}, "training.batchSize", 64),
    ({"freeze": False, "sampler": "auto", "num_items_per_class": 4, "public": False, "scheduler_step": "batch"},
     "training.lockImage", False),
    ({"freeze": ["text"], "to_onnx": True, "num_workers": 1}, "training.lockText", True),
    ({"val_split": 0.2}, "data.valSplit", 0.2),
])
def test_finetuners_fit_arguments_map_onto_the_spec(kwargs: dict[str, Any], path: str, value: Any, client: Client,
                                                    api: FakeRuns) -> None:
    finetuner.fit(model="clip-base-en", train_data="https://example.com/train.csv", run_name="args", client=client,
                  **kwargs)
    found: Any = spec_of(api, "args")
    for key in path.split("."):
        found = found.get(key) if isinstance(found, dict) else None
    assert found == value


def test_a_description_becomes_an_annotation(client: Client, api: FakeRuns) -> None:
    finetuner.fit(model="clip-base-en", train_data="https://example.com/train.csv", run_name="described",
                  description="shoes, first try", callbacks=None, client=client)
    assert api.objects[("team", "described")]["metadata"]["annotations"] == {"kubetune.io/description":
                                                                             "shoes, first try"}


@pytest.mark.parametrize(("kwargs", "needle", "hint"), [
    ({"experiment_name": "shoes"}, "experiment_name", "namespace="),
    ({"model_options": {"pooler": "mean"}}, "model_options", "model_config="),
    ({"miner": "TripletMarginMiner"}, "miner", "drop miner"),
    ({"optimizer_options": {"betas": (0.9, 0.98)}}, "optimizer_options", "weight_decay="),
    ({"scheduler_options": {"num_training_steps": 100}}, "num_training_steps", "max_steps="),
    ({"scheduler_options": {"scheduler_step": "epoch"}}, "scheduler_step", "drop scheduler_step"),
    ({"scheduler_step": "epoch"}, "scheduler_step", "drop scheduler_step"),
    ({"freeze": True}, "freeze=True", "freeze=['image']"),
    ({"output_dim": 128}, "output_dim", "describe_models"),
    ({"public": True}, "public", "bucket"),
    ({"sampler": "class"}, "sampler", "drop sampler"),
    ({"num_items_per_class": 8}, "num_items_per_class", "drop sampler"),
    ({"loss_optimizer": "Adam"}, "loss_optimizer", "drop loss_optimizer"),
    ({"csv_options": object()}, "csv_options", "text_column"),
    ({"device": "tpu"}, "device='tpu'", "gpus=N"),
    ({"device": "cpu", "gpus": 1}, "device='cpu', gpus=1", "drop one"),
    ({"device": "cuda", "gpus": 0}, "gpus=0", "device='cpu'"),
    ({"model_artifact": "s3://b/a", "weights": "s3://b/w"}, "model_artifact", "keep one"),
    ({"no_such_option": 1}, "unknown argument.*no_such_option", "learning_rate"),
])
def test_unsupported_finetuner_arguments_are_config_errors_saying_what_to_write(
        kwargs: dict[str, Any], needle: str, hint: str, client: Client, api: FakeRuns) -> None:
    with pytest.raises(errors.ConfigInvalid, match=needle) as info:
        finetuner.fit(model="clip-base-en", train_data="https://example.com/train.csv", client=client, **kwargs)
    assert info.value.hint and hint in info.value.hint, info.value.hint
    assert api.calls == []


@pytest.mark.parametrize(("name", "instead"), [
    ("build_model", "get_model"), ("cos_sim", "a @ b.T"), ("list_callbacks", "kubetune.callback"),
    ("list_models", "describe_models()"), ("create_experiment", "namespace"), ("get_token", "kubeconfig")])
def test_finetuner_names_kubetune_lacks_say_what_to_write_instead(name: str, instead: str) -> None:
    with pytest.raises(AttributeError, match=f"Finetuner's {name} has no kubetune counterpart: .*{re.escape(instead)}"):
        getattr(finetuner, name)
    with pytest.raises(AttributeError, match=r"has no attribute 'no_such_thing'$"):
        finetuner.no_such_thing  # noqa: B018


def test_finetuners_module_paths_and_spellings_exist() -> None:
    from kubetune.callback import MLFlowLogger, MLflowLogger

    assert finetuner.run.Run is finetuner.Run and finetuner.login() is None and finetuner.notebook_login() is None
    logger = MLFlowLogger(experiment="shoes", tracking_uri="http://mlflow:5000")
    assert logger == MLflowLogger("http://mlflow:5000", "shoes")
    with pytest.raises(TypeError):  # Finetuner's positional order is not kubetune's: keywords only
        MLFlowLogger("shoes", "http://mlflow:5000")  # type: ignore[misc]
    spec: dict[str, Any] = {}
    MLflowLogger("http://mlflow:5000", credentials_secret="mlflow-auth").apply(spec)
    assert spec["callbacks"]["mlflow"]["credentialsSecret"] == {"name": "mlflow-auth"}


# ------------------------------------------------------------------------------------------------ status and metrics
def stored_run(api: FakeRuns, status: dict[str, Any], name: str = "shoes") -> None:
    api.objects[("team", name)] = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
                                   "metadata": {"name": name, "namespace": "team"},
                                   "spec": {"data": {"train": "s3://b/t.csv"}}, "status": status}


@pytest.mark.parametrize(("phase", "status"), [(None, "CREATED"), ("Pending", "CREATED"), ("Suspended", "CREATED"),
                                               ("Running", "STARTED"), ("Succeeded", "FINISHED"),
                                               ("Failed", "FAILED"), ("Cancelled", "CANCELLED")])
def test_status_reads_as_finetuners_dict_and_keeps_its_fields(phase: str | None, status: str, client: Client,
                                                              api: FakeRuns) -> None:
    stored_run(api, {"phase": phase, "progress": {"epoch": 2, "epochs": 5, "summary": "2/5 40%"}} if phase else {})
    st = finetuner.get_run("shoes", client=client).status()
    assert st["status"] == status and set(st) == {"status", "details"} and st["details"]
    assert dict(st) == {"status": status, "details": st["details"]} and str(st) == str(dict(st))
    assert st == {"status": status, "details": st["details"]}
    assert st.phase == phase and (st.progress is None or st.progress.epoch == 2)
    assert st.model_dump(by_alias=True, exclude_none=True).get("phase") == phase


def test_status_details_are_the_runs_message_when_it_has_one(client: Client, api: FakeRuns) -> None:
    stored_run(api, {"phase": "Failed", "message": "train set, row 3: image x.png not found",
                     "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidData"}]})
    st = finetuner.get_run("shoes", client=client).status()
    assert st == {"status": "FAILED", "details": "train set, row 3: image x.png not found"}
    assert st.conditions[0].reason == "InvalidData"
    stored_run(api, {"phase": "Running", "progress": {"summary": "2/5 40%"}})
    assert finetuner.get_run("shoes", client=client).status()["details"] == "Run in progress (2/5 40%)"


def test_metrics_carry_both_kubetunes_and_finetuners_names_as_the_trainer_reports_them(client: Client,
                                                                                      api: FakeRuns) -> None:
    import torch
    from kubetune_trainer import evaluate

    generator = torch.Generator().manual_seed(0)
    texts, image_emb = torch.randn(6, 8, generator=generator), torch.randn(4, 8, generator=generator)
    task = evaluate.RetrievalTask.build([(f"t{i}", f"img{i % 4}") for i in range(6)],
                                        [(f"t{i}", f"img{i}") for i in range(4)])
    reported = {**evaluate.both_directions(texts, image_emb, task, k=3),
                **evaluate.zero_shot_accuracy(image_emb, texts, [0, 1, 2, 3])}
    folder = StatusFolder({"phase": "Succeeded"})
    folder.feed_line(format_event("evaluation", stage="after", epoch=1, metrics=reported))
    stored_run(api, folder.status)
    after = finetuner.get_run("shoes", client=client).metrics()["after"]
    assert after == pytest.approx(reported) and len(reported) <= MAX_METRICS  # nothing cut by the status bound
    for name in ("precision_at_k", "hit_at_k", "average_precision", "reciprocal_rank", "dcg_at_k"):
        assert FINETUNER_PREFIX + name in after and name in after


# ------------------------------------------------------------------------------------------------ encode
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real artifact of an untrained tiny CLIP, written by the trainer's own export (no training: the test is
    about what encode does with documents, not about what the model learnt)."""
    import dataclasses

    import open_clip
    import torch
    from kubetune_trainer import export
    from open_clip.transform import PreprocessCfg

    from tests.unit.trainer.kt_trainer_helpers import TINY_CONFIG

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CONFIG).eval()
    root = tmp_path_factory.mktemp("tiny") / "artifact"
    export.write_artifact(root, model, "kt-tiny", TINY_CONFIG, dataclasses.asdict(PreprocessCfg(size=32)),
                          metrics={}, metadata={})
    return root


def test_encode_fills_the_embeddings_of_a_documentarray_and_returns_it(tiny_artifact: Path,
                                                                      images: dict[str, Path]) -> None:
    clip_text_encoder = finetuner.get_model(artifact=str(tiny_artifact), select_model='clip-text', batch_size=32,
                                            logging_level='WARNING')
    clip_image_encoder = finetuner.get_model(artifact=str(tiny_artifact), select_model='clip-vision')
    text_da = DocumentArray([Document(text='some text to encode')])
    red = images["red.jpg"]
    image_da = DocumentArray([Document(uri=str(red)), Document(uri=str(red)).load_uri_to_blob(),
                              Document(tensor=decoded(red.read_bytes())),
                              Document(uri="data:image/jpeg;base64," + base64.b64encode(red.read_bytes()).decode())])

    assert finetuner.encode(model=clip_text_encoder, data=text_da) is text_da
    assert finetuner.encode(model=clip_image_encoder, data=image_da) is image_da
    assert text_da.embeddings.shape == (1, 32) and image_da.embeddings.shape == (4, 32)
    assert np.allclose(text_da[0].embedding, finetuner.encode(clip_text_encoder, ["some text to encode"])[0])
    expected = finetuner.encode(clip_image_encoder, [str(red)])[0]
    for doc in image_da:  # by path, blob, tensor and data: URI: the same image, the same embedding
        assert np.allclose(doc.embedding, expected, atol=2e-3)
    single = Document(text="one document")
    assert finetuner.encode(clip_text_encoder, single).shape == (1, 32) and single.embedding.shape == (32,)
    assert finetuner.encode(clip_text_encoder, DocumentArray()) == []


def test_get_model_refuses_a_cloud_token_saying_to_download_the_artifact() -> None:
    with pytest.raises(errors.ConfigInvalid, match="token") as info:
        finetuner.get_model("63b52b5b3278416c15353bf3", token="jina-token", select_model="clip-text")
    assert info.value.hint and "save_artifact" in info.value.hint


def test_encode_names_the_document_it_cannot_encode(tiny_artifact: Path, images: dict[str, Path]) -> None:
    text_model = finetuner.get_model(tiny_artifact, select_model="clip-text")
    image_model = finetuner.get_model(tiny_artifact, select_model="clip-vision")
    mixed = DocumentArray([Document(text="a text"), Document(uri=str(images["red.jpg"]))])
    with pytest.raises(errors.ConfigInvalid, match=r"data\[1\] has no text") as info:
        finetuner.encode(text_model, mixed)
    assert info.value.hint and "clip-vision" in info.value.hint
    with pytest.raises(errors.ConfigInvalid, match=r"data\[0\] has no image"):
        finetuner.encode(image_model, mixed)
    assert mixed.embeddings is None


def test_encode_sets_the_embedding_of_a_docarray_v2_doclist(tiny_artifact: Path) -> None:
    from docarray import BaseDoc, DocList
    from docarray.typing import NdArray

    class Text(BaseDoc):
        text: str
        embedding: NdArray | None = None

    docs = DocList[Text]([Text(text="a red dress"), Text(text="a blue shirt")])
    out = finetuner.encode(finetuner.get_model(tiny_artifact, select_model="clip-text"), docs)
    assert isinstance(out, np.ndarray) and out.shape == (2, 32)
    assert np.allclose(np.asarray(docs[1].embedding), out[1])
