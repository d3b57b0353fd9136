"""Finetuner's CLIP guide (text-to-image search) with one import changed, on the harness cluster with the real
trainer image: fit → stream_logs → get_run → status → metrics → save_artifact → get_model → encode.

What differs from the guide, and why: the data is built here as DocumentArrays (Finetuner pulled it from Jina AI
Cloud, which kubetune has not) — real JPEGs of coloured shapes, three captions per image, the query and index sets
in Finetuner's labelled shape; the harness has no GPU, so ``device='cpu'``; a tiny model config stands for
ViT-B-32 (no download, trains in a minute on a CPU) with a learning rate that moves it; the encoded image is a
local JPEG (no internet in the cluster's machine). The calls themselves are the guide's.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import kubetune as finetuner
import pytest
from kubetune import Document, DocumentArray
from kubetune.callback import EvaluationCallback
from PIL import Image, ImageDraw

from tests.cluster.s3 import S3Server
from tests.integration.test_operator_support import OperatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
COLOURS = {"red": (210, 30, 30), "green": (30, 170, 40), "blue": (30, 50, 210), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_jpeg(path: Path, colour: str, shape: str, background: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    box = (12, 12, 52, 52)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(32, 10), (54, 52), (10, 52)], fill=COLOURS[colour])
    image.save(path, format="JPEG", quality=90)
    return path


def captions(colour: str, shape: str) -> list[str]:
    return [f"a {colour} {shape}", f"a {shape} in {colour}", f"{colour} {shape} on a light background"]


def shop(folder: Path) -> tuple[DocumentArray, DocumentArray, DocumentArray, DocumentArray]:
    """(train, eval, query, index): parents with an image chunk and three text chunks (train/eval, by path and
    by blob), text queries and image index documents sharing tags['finetuner_label']."""
    folder.mkdir(parents=True, exist_ok=True)
    train, evaluation, queries, index = DocumentArray(), DocumentArray(), DocumentArray(), DocumentArray()
    backgrounds = [(250, 250, 250), (225, 225, 225), (240, 235, 220)]
    for k, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        label = f"{colour}-{shape}"
        for split, bg in (("train", backgrounds[k % 3]), ("eval", backgrounds[(k + 1) % 3])):
            path = shape_jpeg(folder / f"{split}-{label}.jpg", colour, shape, bg)
            image = Document(uri=str(path), modality="image")
            if split == "eval":
                image.load_uri_to_blob()
            parent = Document(chunks=[image, *(Document(text=t, modality="text") for t in captions(colour, shape))])
            (train if split == "train" else evaluation).append(parent)
        queries.append(Document(text=captions(colour, shape)[0], tags={"finetuner_label": label}))
        index.append(Document(uri=str(folder / f"eval-{label}.jpg"), tags={"finetuner_label": label}))
    return train, evaluation, queries, index


def test_finetuner_clip_guide_with_one_import_changed(e2e_cluster: Any, namespace: str,
                                                      trainer_operator: OperatorProcess, s3_server: S3Server,
                                                      s3_bucket: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    operator = trainer_operator
    for key, value in {"KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint, "KUBETUNE_S3_BUCKET": s3_bucket,
                       "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key
                       }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    finetuner.configure(namespace=namespace, kubeconfig=e2e_cluster.kubeconfig)  # what finetuner.login() was
    train_data, eval_data, query_data, index_data = shop(tmp_path / "shop")
    # ---- the guide, from here on
    run = finetuner.fit(
        model='clip-base-en',
        train_data=train_data,
        eval_data=eval_data,
        epochs=5,
        learning_rate=1e-3,
        loss='CLIPLoss',
        device='cpu',
        callbacks=[
            EvaluationCallback(
                model='clip-text',
                index_model='clip-vision',
                query_data=query_data,
                index_data=index_data,
            )
        ],
        model_config=TINY, batch_size=12, num_workers=0, cpu="1", memory="3Gi",
    )
    assert run.status()["status"] in ("CREATED", "STARTED"), (dict(run.status()), operator.log())

    for entry in run.stream_logs():
        print(entry)

    run = finetuner.get_run(run.name)
    status = run.status()
    assert status == {"status": "FINISHED", "details": status["details"]}, (dict(status), operator.log())
    logged = capsys.readouterr().out
    assert "evaluation (after" in logged, logged[-3000:]

    metrics = run.metrics()
    for stage in ("before", "after"):
        for name in ("precision_at_k", "hit_at_k", "average_precision", "reciprocal_rank", "dcg_at_k"):
            assert f"clip-text-to-clip-vision_{name}" in metrics[stage] and name in metrics[stage], name
    assert metrics["before"]["queries"] == metrics["after"]["queries"] == len(query_data)

    artifact = run.save_artifact('clip-model')

    text_da = DocumentArray([Document(text='some text to encode')])
    image_da = DocumentArray([Document(uri=str(tmp_path / "shop" / "eval-red-circle.jpg"))])

    clip_text_encoder = finetuner.get_model(artifact=artifact, select_model='clip-text')
    clip_image_encoder = finetuner.get_model(artifact=artifact, select_model='clip-vision')

    finetuner.encode(model=clip_text_encoder, data=text_da)
    finetuner.encode(model=clip_image_encoder, data=image_da)

    print(text_da.embeddings.shape)
    print(image_da.embeddings.shape)
    assert capsys.readouterr().out.splitlines() == ["(1, 32)", "(1, 32)"]
