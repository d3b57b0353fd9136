"""Real training of the tiny model on the synthetic shapes: loss, metrics, events, artifact, exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, MARKER, Event, parse_line
from kubetune.storage import sha256_file, verify_manifest
from kubetune_trainer import export
from safetensors.torch import load_file

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def trained(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 10})
    config = write_run(root / "run.yaml", spec)
    code, events, raw = run_trainer(["--config", str(config), "--output-dir", str(root / "out")])
    return {"code": code, "events": events, "raw": raw, "out": root / "out"}


def test_run_succeeds_and_every_event_line_parses(trained: dict[str, Any]) -> None:
    assert trained["code"] == 0, trained["raw"][-2000:]
    lines = [line for line in trained["raw"].splitlines() if line.startswith(MARKER)]
    assert lines and all(parse_line(line) is not None for line in lines)
    events: list[Event] = trained["events"]
    assert events[0].type == "started" and events[-1].type == "finished"
    started = events[0]
    assert started.total_steps == 10 * (256 // 32) and started.model_extra["world_size"] == 1
    progress = of_type(events, "progress")
    assert progress[-1].step == started.total_steps and progress[-1].eta_seconds == 0
    # the first step has no window to measure a rate over; every later one has a finite, positive rate
    assert progress[0].samples_per_second is None
    assert all(p.samples_per_second and 0 < p.samples_per_second < 1e6 for p in progress[1:])
    assert [e.stage for e in of_type(events, "evaluation")] == ["before", "after"]
    assert len(of_type(events, "metrics")) == 10


def test_loss_falls(trained: dict[str, Any]) -> None:
    epochs = [e for e in trained["events"] if e.type == "metrics"]
    first, last = epochs[0], epochs[-1]
    assert first.train_loss is not None and last.train_loss is not None
    assert first.val_loss is not None and last.val_loss is not None
    # An untrained CLIP sits near ln(batch) = ln 32 ≈ 3.47 (uniform logits). The synthetic captions repeat
    # (48 captions, batches of 32), so the floor is above 0; the tiny model reaches ≈1.2 here. 2.5 is far
    # from both chance and the floor, and a broken optimiser/loss cannot get there.
    assert last.train_loss < 2.5 < math.log(32)
    assert last.train_loss < 0.75 * first.train_loss
    assert last.val_loss < first.val_loss - 0.5  # held-out pairs too: it generalises, not memorises


def test_after_metrics_beat_before(trained: dict[str, Any]) -> None:
    evaluations = {e.stage: e.metrics for e in of_type(trained["events"], "evaluation")}
    before, after = evaluations["before"], evaluations["after"]
    assert before is not None and after is not None
    # 96 query captions over 96 eval images, each caption paired with 2 images: a random ranking has
    # R@5 ≈ 1 − C(94,5)/C(96,5) ≈ 0.10 and mean rank ≈ 32. The trained tiny model reaches R@5 ≈ 0.9; 0.5 and a
    # 0.25 margin leave room for seed noise yet fail for any model that did not learn colour and shape.
    assert after["R@5"] >= 0.5 and after["R@5"] >= before["R@5"] + 0.25
    assert after["reciprocal_rank"] > before["reciprocal_rank"] + 0.15
    assert after["ndcg_at_k"] > before["ndcg_at_k"] and after["mean_rank"] < before["mean_rank"] / 2
    # image→text: each of the 96 images queries the captions; the same training lifts it as much
    assert after["image_to_text_R@5"] >= before["image_to_text_R@5"] + 0.25
    assert after["clip-text-to-clip-vision_hit_at_k"] > before["clip-text-to-clip-vision_hit_at_k"]
    metrics_file = json.loads((trained["out"] / "artifact" / "metrics.json").read_text())
    assert metrics_file["before"]["R@5"] == pytest.approx(before["R@5"])
    assert metrics_file["after"]["R@5"] == pytest.approx(after["R@5"])


def test_artifact_manifest_and_event(trained: dict[str, Any]) -> None:
    root = trained["out"] / "artifact"
    assert verify_manifest(root) == []
    (artifact,) = of_type(trained["events"], "artifact")
    assert artifact.sha256 == sha256_file(root / "manifest.json")
    assert artifact.size == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert artifact.uri == str(root)
    (root / "metadata.json").write_text((root / "metadata.json").read_text() + " ")
    assert verify_manifest(root) == ["metadata.json: size or sha256 differs"]


def test_towers_hold_only_their_own_weights_and_load_back(trained: dict[str, Any]) -> None:
    root = trained["out"] / "artifact"
    text = load_file(str(root / "clip-text" / "model.safetensors"))
    vision = load_file(str(root / "clip-vision" / "model.safetensors"))
    assert text and vision
    assert not any(k.startswith("visual") or k in ("logit_scale", "conv1.weight") for k in text)
    assert "conv1.weight" in vision and "token_embedding.weight" not in vision
    assert not any("token_embedding" in k or (k.startswith("transformer.resblocks.0.attn") and "visual" in k)
                   for k in vision)
    # the whole model, rebuilt from the artifact, has exactly the keys of the two towers + logit_scale
    open_clip.add_model_config(Path(trained["out"]) / ".work" / "model-configs" / "kt-tiny.json")
    full = open_clip.create_model("kt-tiny").eval()
    state = export.load_artifact_state_dict(root)
    full.load_state_dict(state, strict=True)
    assert set(state) == {f"visual.{k}" for k in vision} | set(text) | {"logit_scale"}
    text_tower = export.load_tower(root / "clip-text")
    vision_tower = export.load_tower(root / "clip-vision")
    tokenizer = export.load_tokenizer(root / "clip-text")
    tokens = tokenizer(["a red circle on a white background", "a blue cross on a black background"])
    assert tokens.shape[1] == TINY_CONFIG["text_cfg"]["context_length"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(text_tower(tokens), full.encode_text(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(vision_tower(images), full.encode_image(images), atol=1e-6, rtol=0)
    transform = export.load_image_transform(root / "clip-vision")
    from PIL import Image

    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_bad_config_exits_78_with_a_failed_event(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    spec = tiny_spec(str(synthetic_data["train"]), training={"epochs": 0})
    code, events, _ = run_trainer(["--config", str(write_run(tmp_path / "run.json", spec)),
                                   "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_CONFIG
    (failed,) = of_type(events, "failed")
    assert failed.reason == "InvalidConfig" and failed.retryable is False and "epochs" in (failed.message or "")
    code, events, _ = run_trainer(["--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path)])
    assert code == EXIT_BAD_CONFIG and of_type(events, "failed")[0].reason == "InvalidConfig"


def _broken_csv(tmp_path: Path, synthetic: dict[str, Path]) -> Path:
    lines = synthetic["train"].read_text().splitlines()
    base = synthetic["train"].parent
    (tmp_path / "not-an-image.png").write_text("hello")
    rows = [f"{text},{base / image}" for text, image in (line.split(",") for line in lines[1:65])]
    rows.insert(3, f"a red circle on a white background,{tmp_path / 'missing.png'}")
    rows.insert(10, f"a blue cross on a black background,{tmp_path / 'not-an-image.png'}")
    path = tmp_path / "train.csv"
    path.write_text("text,image\n" + "\n".join(rows) + "\n")
    return path


def test_bad_row_exits_65_naming_set_row_and_reason(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    csv_path = _broken_csv(tmp_path, synthetic_data)
    spec = tiny_spec(str(csv_path), training={"epochs": 1})
    code, events, _ = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                   "--output-dir", str(tmp_path / "out")])
    assert code == EXIT_BAD_DATA
    (failed,) = of_type(events, "failed")
    assert failed.reason == "InvalidData" and failed.retryable is False
    assert "train set, row 4: image" in (failed.message or "") and "not found" in (failed.message or "")


def test_skip_bad_rows_counts_them(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    csv_path = _broken_csv(tmp_path, synthetic_data)
    spec = tiny_spec(str(csv_path), data={"train": str(csv_path), "skipBadRows": True, "valSplit": 0.25},
                     training={"epochs": 1})
    code, events, raw = run_trainer(["--config", str(write_run(tmp_path / "run.yaml", spec)),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == 0, raw[-1500:]
    started = of_type(events, "started")[0]
    assert started.model_extra["skipped_rows"] == {"train": 2}
    assert started.model_extra["train_pairs"] == 64 - 16  # 64 good rows, a quarter held out for validation
