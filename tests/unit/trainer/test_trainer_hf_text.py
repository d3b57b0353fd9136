"""A Hugging Face text tower (the ``xlm-roberta-base-ViT-B-32`` family), offline.

A tiny WordPiece tokenizer is trained on the synthetic captions with ``tokenizers`` and saved as a HF tokenizer
directory; a random-init tiny ``XLMRobertaConfig`` is saved beside it. An open_clip custom config points
``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` at the two directories, like xlm-roberta-base-ViT-B-32's
config (mean pooler, MLP projection) points at the hub. ``HF_HUB_OFFLINE=1``: nothing may be downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune.storage import verify_manifest
from kubetune_trainer import export

pytestmark = pytest.mark.unit
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONTEXT = 16
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids: bos 0, pad 1, eos 2, unk 3


def build_hf_text_dirs(root: Path, captions: list[str]) -> tuple[Path, Path]:
    """(tokenizer dir, model dir): a WordPiece tokenizer trained on ``captions`` and a tiny XLM-R config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
        ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=CONTEXT)
    tokenizer_dir = root / "tiny-tokenizer"
    fast.save_pretrained(tokenizer_dir)
    config = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, max_position_embeddings=CONTEXT + 4,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model_dir = root / "tiny-xlm-roberta"
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(model_dir)
    return tokenizer_dir, model_dir


def hf_config(tokenizer_dir: Path, model_dir: Path) -> dict[str, Any]:
    return {"embed_dim": TINY_CONFIG["embed_dim"], "vision_cfg": dict(TINY_CONFIG["vision_cfg"]),
            "text_cfg": {"hf_model_name": str(model_dir), "hf_tokenizer_name": str(tokenizer_dir),
                         "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp", "context_length": CONTEXT,
                         "hf_model_pretrained": True}}


@pytest.fixture(scope="module")
def hf_run(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("hf")
    captions = [line.rsplit(",", 1)[0] for line in synthetic_data["train"].read_text().splitlines()[1:]]
    tokenizer_dir, model_dir = build_hf_text_dirs(root, captions)
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     model={"name": "kt-tiny-xlmr", "config": hf_config(tokenizer_dir, model_dir)},
                     training={"epochs": 3, "learningRate": 2e-3}, export={"onnx": True})
    try:
        code, events, raw = run_trainer(["--config", str(write_run(root / "run.yaml", spec)),
                                         "--output-dir", str(root / "out")])
    finally:
        mp.undo()
    return {"code": code, "events": events, "raw": raw, "artifact": root / "out" / "artifact",
            "tokenizer_dir": tokenizer_dir}


def test_hf_text_tower_trains_offline(hf_run: dict[str, Any]) -> None:
    assert hf_run["code"] == 0, hf_run["raw"][-3000:]
    epochs = of_type(hf_run["events"], "metrics")
    first, last = epochs[0].train_loss, epochs[-1].train_loss
    assert first is not None and last is not None
    # Batches of 32: uniform logits give ln 32 ≈ 3.47 and the first epoch averages ≈3.7. 24 steps take this
    # tiny XLM-R + ViT to ≈3.0; a text tower that ignores its input (a pad / attention-mask mix-up, a tokenizer
    # that maps every caption to <unk>) cannot separate the 48 captions and stays at or above chance.
    assert last < math.log(32) - 0.2 and last < 0.9 * first


def test_artifact_text_tower_is_the_hf_encoder_alone(hf_run: dict[str, Any]) -> None:
    assert hf_run["code"] == 0, hf_run["raw"][-3000:]
    artifact: Path = hf_run["artifact"]
    text_config = json.loads((artifact / "clip-text" / "config.json").read_text())
    assert text_config["custom_text"] is True
    preprocessing = json.loads((artifact / "clip-text" / "preprocessing.json").read_text())
    # the tokenizer and encoder config travel inside the tower: nothing names the training machine's paths
    assert preprocessing == {"kind": "hf", "hf_tokenizer_name": "hf", "context_length": CONTEXT}
    assert text_config["text_cfg"]["hf_model_name"] == "hf"
    assert (artifact / "clip-text" / "hf" / "config.json").is_file()
    from safetensors.torch import load_file

    keys = set(load_file(str(artifact / "clip-text" / "model.safetensors")))
    assert any(k.startswith("transformer.") for k in keys) and any(k.startswith("proj.") for k in keys)
    assert not any(k.startswith("visual.") for k in keys)
    # the tower rebuilds from its own directory (offline) and encodes what its own tokenizer produces
    tower = export.load_tower(artifact / "clip-text")
    tokens = export.load_tokenizer(artifact / "clip-text")(["a red circle on a white background"])
    assert tokens.shape == (1, CONTEXT) and tokens[0, 0] == 0 and (tokens[0] == 1).any()  # <s> … <pad>
    with torch.no_grad():
        assert tower(tokens).shape == (1, TINY_CONFIG["embed_dim"])


def test_hf_text_tower_exports_to_onnx(hf_run: dict[str, Any]) -> None:
    assert hf_run["code"] == 0, hf_run["raw"][-3000:]
    artifact: Path = hf_run["artifact"]
    report = json.loads((artifact / "metadata.json").read_text())["onnx"]
    assert report["clip-text"]["max_abs_diff"] <= export.ONNX_TOLERANCE
    assert verify_manifest(artifact) == []



MOVED_ENCODE = """
import json, sys
import kubetune
model = kubetune.get_model(sys.argv[1], select_model="clip-text")
print(json.dumps(kubetune.encode(model, json.loads(sys.argv[2])).tolist()))
"""


def test_hf_artifact_moved_to_a_machine_without_network_or_sources_encodes_identically(
        hf_run: dict[str, Any], tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    import kubetune

    assert hf_run["code"] == 0, hf_run["raw"][-3000:]
    texts = ["a red circle on a white background", "a blue square", "ein gelbes Dreieck"]
    here = kubetune.encode(kubetune.get_model(hf_run["artifact"], select_model="clip-text"), texts)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(hf_run["artifact"], moved)
    sources = [hf_run["tokenizer_dir"], hf_run["tokenizer_dir"].parent / "tiny-xlm-roberta"]
    hidden = [p.rename(p.with_name(p.name + ".hidden")) for p in sources]  # as on a machine that never had them
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "HF_ENDPOINT": "http://127.0.0.1:9"}  # an empty cache; a hub request would fail
        proc = subprocess.run([sys.executable, "-c", MOVED_ENCODE, str(moved), json.dumps(texts)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        for path, original in zip(hidden, sources, strict=True):
            path.rename(original)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert there.shape == (3, TINY_CONFIG["embed_dim"])
    assert (there - torch.as_tensor(here)).abs().max() <= 1e-6


def test_hf_text_tower_without_clip_weights_must_say_how_to_start(tmp_path: Path,
                                                                  synthetic_data: dict[str, Path]) -> None:
    from kubetune.api.spec import ModelSpec
    from kubetune_trainer.model import ModelError, build

    config = hf_config(tmp_path / "tok", tmp_path / "enc")
    del config["text_cfg"]["hf_model_pretrained"]
    with pytest.raises(ModelError, match=r"hf_model_pretrained .* to true .* or to false for a random init"):
        build(ModelSpec(name="kt-tiny-xlmr-unsaid", config=config), torch.device("cpu"), "fp32", tmp_path)


def test_hf_text_tower_asked_to_start_from_its_weights_loads_them(tmp_path: Path,
                                                                   synthetic_data: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.api.spec import ModelSpec
    from kubetune_trainer.model import build
    from transformers import XLMRobertaModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    captions = [line.rsplit(",", 1)[0] for line in synthetic_data["train"].read_text().splitlines()[1:]]
    tokenizer_dir, model_dir = build_hf_text_dirs(tmp_path, captions)
    saved = XLMRobertaModel.from_pretrained(str(model_dir), add_pooling_layer=False).state_dict()
    torch.manual_seed(123)  # a random init would differ from the saved weights
    model = build(ModelSpec(name="kt-tiny-xlmr-pretrained", config=hf_config(tokenizer_dir, model_dir)),
                  torch.device("cpu"), "fp32", tmp_path).model
    encoder = model.text.transformer.state_dict()  # type: ignore[union-attr]
    assert set(saved) <= set(encoder)
    for key, value in saved.items():
        assert torch.equal(encoder[key], value), key


def test_an_artifact_naming_an_unreachable_tokenizer_is_a_clear_sdk_error(hf_run: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    import shutil

    import kubetune
    from kubetune.api.errors import ArtifactCorrupt

    assert hf_run["code"] == 0, hf_run["raw"][-3000:]
    old = tmp_path / "old-artifact"
    shutil.copytree(hf_run["artifact"], old)
    shutil.rmtree(old / "clip-text" / "hf")  # as artifacts written before the tokenizer travelled with them
    info = json.loads((old / "clip-text" / "preprocessing.json").read_text())
    info["hf_tokenizer_name"] = str(tmp_path / "gone" / "tiny-tokenizer")  # the training machine's path
    (old / "clip-text" / "preprocessing.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactCorrupt, match="tiny-tokenizer") as caught:
        kubetune.get_model(old, select_model="clip-text")
    assert caught.value.hint and "re-export" in caught.value.hint
