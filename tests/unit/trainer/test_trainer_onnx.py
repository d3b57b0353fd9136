"""ONNX export in a full tiny run: ``spec.export.onnx: true`` → per-tower ONNX files verified with onnxruntime.

The trainer checks its own export (|Δ| ≤ 1e-4 of the embedding norm against the trained model); these tests
check it again, independently: onnxruntime on real tokenised captions and real preprocessed images, fed as
clip-as-service feeds them (int32 ``input_ids`` + ``attention_mask``, float32 ``pixel_values``), against
open_clip's ``encode_text`` / ``encode_image`` (unnormalised) of a model rebuilt from the artifact's weights.
clip-as-service's own contract is tested in ``test_trainer_onnx_clip_as_service.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune.storage import verify_manifest
from kubetune_trainer import export
from PIL import Image

pytestmark = pytest.mark.unit
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_run(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("onnx")
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 1, "maxSteps": 4}, export={"onnx": True})
    code, events, raw = run_trainer(["--config", str(write_run(root / "run.yaml", spec)),
                                     "--output-dir", str(root / "out")])
    return {"code": code, "events": events, "raw": raw, "artifact": root / "out" / "artifact"}


def _model_from_artifact(artifact: Path) -> torch.nn.Module:
    open_clip.add_model_config(_config_file(artifact))
    model = open_clip.create_model("kt-tiny-onnx-check", pretrained=None)
    model.load_state_dict(export.load_artifact_state_dict(artifact), strict=False)
    return model.eval()


def _config_file(artifact: Path) -> Path:
    path = artifact.parent / "kt-tiny-onnx-check.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def test_run_writes_both_onnx_files_in_the_manifest(onnx_run: dict[str, Any]) -> None:
    assert onnx_run["code"] == 0, onnx_run["raw"][-3000:]
    artifact: Path = onnx_run["artifact"]
    assert (artifact / "clip-text" / "textual.onnx").is_file()  # clip-as-service's file names
    assert (artifact / "clip-vision" / "visual.onnx").is_file()
    manifest = json.loads((artifact / "manifest.json").read_text())["files"]
    assert {"clip-text/textual.onnx", "clip-vision/visual.onnx"} <= set(manifest)
    assert verify_manifest(artifact) == []
    (event,) = of_type(onnx_run["events"], "artifact")
    assert event.files == len(manifest) + 1
    report = json.loads((artifact / "metadata.json").read_text())["onnx"]
    length, size = TINY_CONFIG["text_cfg"]["context_length"], TINY_CONFIG["vision_cfg"]["image_size"]
    assert report["clip-text"]["inputs"] == {"input_ids": {"dtype": "int32", "shape": ["batch_size", length]},
                                             "attention_mask": {"dtype": "int32", "shape": ["batch_size", length]}}
    assert report["clip-vision"]["inputs"] == {"pixel_values": {"dtype": "float32",
                                                                "shape": ["batch_size", 3, size, size]}}
    for tower in report.values():
        assert tower["output"] == "embeddings" and tower["normalized"] is False and tower["opset"] == 17
        assert 0 <= tower["max_rel_diff"] <= export.ONNX_TOLERANCE and tower["max_abs_diff"] >= 0


def test_onnx_matches_open_clip_on_real_captions_and_images(onnx_run: dict[str, Any],
                                                             synthetic_data: dict[str, Path]) -> None:
    assert onnx_run["code"] == 0, onnx_run["raw"][-3000:]
    artifact: Path = onnx_run["artifact"]
    model = _model_from_artifact(artifact)
    rows = [line.split(",", 1) for line in synthetic_data["eval"].read_text().splitlines()[1:6]]
    tokenizer = export.load_tokenizer(artifact / "clip-text")
    tokens = tokenizer([text for text, _ in rows])
    transform = export.load_image_transform(artifact / "clip-vision")
    pixels = torch.stack([transform(Image.open(synthetic_data["eval"].parent / image.strip()).convert("RGB"))
                          for _, image in rows])
    with torch.no_grad():
        want_text = model.encode_text(tokens).numpy()
        want_image = model.encode_image(pixels).numpy()
    text = ort.InferenceSession(str(artifact / "clip-text" / "textual.onnx"), providers=["CPUExecutionProvider"])
    vision = ort.InferenceSession(str(artifact / "clip-vision" / "visual.onnx"),
                                  providers=["CPUExecutionProvider"])
    feed = export.text_feed(tokens, export.pad_token_id(tokenizer))
    assert feed["input_ids"].dtype == torch.int32 and feed["attention_mask"].dtype == torch.int32
    (got_text,) = text.run(None, {name: value.numpy() for name, value in feed.items()})
    (got_image,) = vision.run(None, {"pixel_values": pixels.numpy()})
    assert got_text.shape == (5, TINY_CONFIG["embed_dim"]) and got_image.shape == (5, TINY_CONFIG["embed_dim"])
    assert np.abs(got_text - want_text).max() <= 1e-4
    assert np.abs(got_image - want_image).max() <= 1e-4
    # unnormalised, as open_clip's encode_* and clip-as-service's torch runtime return embeddings
    assert not np.allclose(np.linalg.norm(got_text, axis=-1), 1.0, atol=1e-3)
    # the text input length is static: the exported graph is for exactly context_length tokens
    assert text.get_inputs()[0].shape[1] == TINY_CONFIG["text_cfg"]["context_length"]


def test_verify_onnx_rejects_a_file_that_does_not_match(onnx_run: dict[str, Any]) -> None:
    assert onnx_run["code"] == 0, onnx_run["raw"][-3000:]
    artifact: Path = onnx_run["artifact"]
    tower = export.load_tower(artifact / "clip-vision")
    pixels = {"pixel_values": torch.randn(2, 3, 32, 32)}
    assert export.verify_onnx(export._VisionGraph(tower).eval(), artifact / "clip-vision" / "visual.onnx",
                              pixels) <= export.ONNX_TOLERANCE
    with torch.no_grad():
        tower.proj.add_(torch.randn_like(tower.proj))  # a different model: the ONNX file no longer matches it
    with pytest.raises(export.ExportError, match="differs from torch"):
        export.verify_onnx(export._VisionGraph(tower).eval(), artifact / "clip-vision" / "visual.onnx", pixels)


def test_verify_onnx_rejects_a_feed_of_other_dtypes(onnx_run: dict[str, Any]) -> None:
    assert onnx_run["code"] == 0, onnx_run["raw"][-3000:]
    artifact: Path = onnx_run["artifact"]
    graph = export._TextGraph(export.load_tower(artifact / "clip-text")).eval()
    tokens = export.load_tokenizer(artifact / "clip-text")(["a red circle"])
    feed = export.text_feed(tokens)
    assert export.verify_onnx(graph, artifact / "clip-text" / "textual.onnx", feed) <= export.ONNX_TOLERANCE
    int64 = {name: value.long() for name, value in feed.items()}  # what the graph would take without the casts
    with pytest.raises(export.ExportError, match="the graph takes"):
        export.verify_onnx(graph, artifact / "clip-text" / "textual.onnx", int64)
