"""get_model / encode / the report on a real artifact: the real trainer fine-tunes a tiny CLIP locally
(``kubetune.run_local``, ~15 s on 2 cores), then the towers are loaded back from the artifact alone."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import kubetune
import numpy as np
import pytest
import yaml
from kubetune.api import errors

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def make_tiny_run(tmp: Path, epochs: int = 3, onnx: bool = True) -> Path:
    """A run file like the quickstart's, with fewer steps and the ONNX export."""
    doc = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = "tiny"
    doc["spec"]["data"] = {"train": str(EXAMPLES / "data" / "train.csv"), "eval": str(EXAMPLES / "data" / "eval.csv")}
    doc["spec"]["training"].update({"epochs": epochs, "maxSteps": 16})
    doc["spec"]["export"] = {"onnx": onnx}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_local_run(tmp: Path) -> Any:
    return kubetune.run_local(make_tiny_run(tmp), output_dir=tmp / "run")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_local_run(tmp_path_factory.mktemp("tiny"))


def eval_rows() -> list[tuple[str, Path]]:
    with (EXAMPLES / "data" / "eval.csv").open() as handle:
        return [(r["text"], EXAMPLES / "data" / r["image"]) for r in csv.DictReader(handle)]


def test_local_run_produces_a_verified_artifact(tiny_run: Any) -> None:
    assert tiny_run.succeeded
    assert kubetune.verify_artifact(tiny_run.artifact) == []
    metrics = tiny_run.metrics()
    assert metrics["before"]["R@5"] < metrics["after"]["R@5"]
    for name in ("clip-text/model.safetensors", "clip-vision/model.safetensors", "metadata.json",
                 "clip-text/textual.onnx", "clip-vision/visual.onnx"):
        assert (tiny_run.artifact / name).is_file(), name


def test_a_local_runs_artifact_is_saved_as_a_cluster_runs_is(tiny_run: Any, tmp_path: Path) -> None:
    status = tiny_run.status()
    assert status.phase == "Succeeded" and status.artifact is not None and status.artifact.sha256
    assert status.metrics is not None and status.metrics.after == tiny_run.metrics()["after"]
    saved = tiny_run.save_artifact(tmp_path / "model")
    assert kubetune.verify_artifact(saved) == []
    assert (saved / "clip-text" / "model.safetensors").read_bytes() == (
        tiny_run.artifact / "clip-text" / "model.safetensors").read_bytes()


def test_encode_text_and_images(tiny_run: Any) -> None:
    text_model = kubetune.get_model(tiny_run.artifact, select_model="clip-text")
    image_model = kubetune.get_model(tiny_run.output_dir, select_model="clip-vision")  # a run dir works too
    assert text_model.embed_dim == 64 and "clip-text" in repr(text_model)
    texts = kubetune.encode(text_model, ["a red circle on a white background", "a blue cross on a black background"])
    assert texts.shape == (2, 64) and texts.dtype == np.float32
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert kubetune.encode(text_model, "one string").shape == (1, 64)

    path = eval_rows()[0][1]
    from PIL import Image

    pil = Image.open(path).convert("RGB")
    hwc = np.asarray(pil)
    chw_float = hwc.transpose(2, 0, 1).astype(np.float32) / 255.0
    inputs: list[Any] = [str(path), path, f"file://{path}", pil, path.read_bytes(), hwc, chw_float]
    embeddings = kubetune.encode(image_model, inputs)
    assert embeddings.shape == (len(inputs), 64)
    for row in embeddings[1:]:  # every way of passing the same image gives the same embedding
        assert np.allclose(row, embeddings[0], atol=2e-3)
    assert kubetune.encode(image_model, np.stack([hwc, hwc])).shape == (2, 64)  # an (N, H, W, C) batch
    assert kubetune.encode(image_model, []).shape == (0, 64)


def test_encode_reproduces_the_runs_own_evaluation(tiny_run: Any) -> None:
    """Towers loaded from the artifact alone rank the eval set exactly as the trainer's final evaluation did."""
    import torch
    from kubetune_trainer import evaluate

    rows = eval_rows()
    text_model = kubetune.get_model(tiny_run.artifact, "clip-text")
    image_model = kubetune.get_model(tiny_run.artifact, "clip-vision")
    task = evaluate.RetrievalTask.build([(t, str(p.resolve())) for t, p in rows],
                                        [(t, str(p.resolve())) for t, p in rows])
    text_emb = torch.from_numpy(kubetune.encode(text_model, task.query_texts))
    image_emb = torch.from_numpy(kubetune.encode(image_model, task.index_keys))
    ours = evaluate.retrieval_metrics(text_emb, image_emb, task.relevant, k=10)
    after = tiny_run.metrics()["after"]
    for name in ("R@1", "R@5", "reciprocal_rank", "ndcg_at_k"):
        assert ours[name] == pytest.approx(after[name], abs=1e-3), name


def test_encode_doclist(tiny_run: Any) -> None:
    from docarray import BaseDoc, DocList
    from docarray.documents import ImageDoc, TextDoc

    text_model = kubetune.get_model(tiny_run.artifact, "clip-text")
    image_model = kubetune.get_model(tiny_run.artifact, "clip-vision")
    texts = DocList[TextDoc]([TextDoc(text="a red circle on a white background"), TextDoc(text="a green square")])
    assert kubetune.encode(text_model, texts).shape == (2, 64)
    path = eval_rows()[0][1]
    images = DocList[ImageDoc]([ImageDoc(url=str(path))])
    direct = kubetune.encode(image_model, [str(path)])
    assert np.allclose(kubetune.encode(image_model, images), direct, atol=1e-5)

    class Nothing(BaseDoc):
        label: str = "x"

    with pytest.raises(errors.ConfigInvalid, match="no tensor"):
        kubetune.encode(image_model, DocList[Nothing]([Nothing()]))


def test_onnx_matches_torch(tiny_run: Any) -> None:
    pytest.importorskip("onnxruntime")
    if not (tiny_run.artifact / "clip-text" / "textual.onnx").is_file():
        with pytest.raises(errors.ArtifactMissing, match="to_onnx=True"):
            kubetune.get_model(tiny_run.artifact, "clip-text", is_onnx=True)
        pytest.skip("the tiny run has no ONNX export (the trainer's export fails on this config: "
                    "aten::_native_multi_head_attention at opset 18)")
    for kind, data in (("clip-text", ["a red circle on a white background", "a grey square"]),
                       ("clip-vision", [str(p) for _, p in eval_rows()[:3]])):
        torch_model = kubetune.get_model(tiny_run.artifact, kind)
        onnx_model = kubetune.get_model(tiny_run.artifact, kind, is_onnx=True)
        assert np.allclose(kubetune.encode(onnx_model, data), kubetune.encode(torch_model, data), atol=1e-4)


def test_get_model_errors(tiny_run: Any, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigInvalid, match="select_model"):
        kubetune.get_model(tiny_run.artifact, select_model="clip-audio")
    with pytest.raises(errors.ArtifactMissing, match="no manifest"):
        kubetune.get_model(tmp_path, "clip-text")
    text_model = kubetune.get_model(tiny_run.artifact, "clip-text")
    with pytest.raises(errors.ConfigInvalid, match="clip-text encodes strings"):
        kubetune.encode(text_model, [np.zeros((4, 4, 3), dtype=np.uint8)])
    image_model = kubetune.get_model(tiny_run.artifact, "clip-vision")
    with pytest.raises(errors.ConfigInvalid, match="no such image"):
        kubetune.encode(image_model, [str(tmp_path / "absent.png")])


def test_cli_encode(tiny_run: Any, tmp_path: Path) -> None:
    import json

    from kubetune.sdk.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = runner.invoke(app, ["encode", str(tiny_run.artifact), "--text", "a red circle", "--text", "a blue cross",
                              "-o", "json", "--save", str(tmp_path / "e.npy")])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["model"] == "clip-text" and payload["shape"] == [2, 64]
    assert np.load(tmp_path / "e.npy").shape == (2, 64)
    image = str(eval_rows()[0][1])
    out = runner.invoke(app, ["encode", str(tiny_run.artifact), "--image", image])
    assert out.exit_code == 0 and "clip-vision embeddings (1, 64)" in out.output


def test_report_html(tiny_run: Any, tmp_path: Path) -> None:
    path = kubetune.write_report(tiny_run.output_dir, out=tmp_path / "r.html", top_k=4)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert page.count('<div class="q"') == 6
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 6 * 2 * 4 and all(src.startswith("data:image/png;base64,") for src in images)
    import base64

    from PIL import Image

    first = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
    assert first.size[0] <= 96 and first.size[1] <= 96
    assert page.count("<svg") == 2 and "<polyline" in page
    assert 'id="metrics"' in page and "R@5" in page
    assert "ranks differently" not in page  # the rebuilt starting model matches the run's own 'before'
    custom = kubetune.write_report(tiny_run.artifact, out=tmp_path / "q.html", queries=["a red circle on a white "
                                                                                        "background"], top_k=2)
    assert custom.read_text().count('<div class="q"') == 1
