"""The ONNX towers under clip-as-service's ONNX runtime (clip_server 0.8.3 = jina-ai/clip-as-service@0341057).

The artifact: a tiny untrained CLIP with ViT-B-32's input geometry (77 tokens, 224 px, OpenAI mean/std), written
by ``export.write_artifact(onnx=True)``. Two kinds of test run it:

- *transcribed contract* (always runs): ``cas_text_feed`` / ``cas_image_feed`` rebuild clip_server's feed line by
  line from its source (names, dtypes, shapes, tokenisation, preprocessing) and onnxruntime runs the graphs with
  clip_server's session options; the embeddings are compared with the torch model's.
- *clip_server's own code* (``test_clip_server_runs_the_export``; skipped where ``clip_server`` is not
  importable): its ``CLIPOnnxModel`` loads the model directory made by ``export.clip_as_service_dir``, its
  ``Tokenizer``, ``_transform_blob`` and ``preproc_text`` / ``preproc_image`` build the feed. clip_server pins
  ``docarray==0.21`` and ``open_clip_torch<2.9``, so it cannot share kubetune's environment: install it beside
  it with ``pip install --no-deps --target DIR clip_server==0.8.3 pillow-avif-plugin`` (plus setuptools' for
  ``pkg_resources``) and put DIR on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from kubetune.storage import sha256_file
from kubetune_trainer import export
from open_clip.transform import PreprocessCfg
from PIL import Image
from torch import nn

pytestmark = pytest.mark.unit
ort = pytest.importorskip("onnxruntime")

CAS_NAME = "ViT-B-32::openai"  # a clip_server ONNX model name with this geometry: 77 tokens, 224 px
CAS_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXTS = ["a red circle on a white background", "A BLUE cross!", "two  grey squares, one tilted " * 12]
# OpenAI's CLIP normalisation, as clip_server/model/clip.py hard-codes it
CAS_MEAN = (0.48145466, 0.4578275, 0.40821073)
CAS_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def cas_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CAS_CONFIG).eval()
    root = tmp_path_factory.mktemp("cas") / "artifact"
    export.write_artifact(root, model, "kt-tiny-cas", CAS_CONFIG, dataclasses.asdict(PreprocessCfg(size=224)),
                          metrics={}, metadata={}, onnx=True)
    return root, model


def image_blobs() -> list[bytes]:
    """PNG bytes of images of other sizes and aspect ratios than 224², so resize and crop matter."""
    generator = np.random.default_rng(0)
    blobs = []
    for width, height in ((300, 260), (224, 224), (180, 400)):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return blobs


def cas_text_feed(texts: list[str], context_length: int = 77) -> dict[str, np.ndarray]:
    """clip_server's text feed for an open_clip-named model, transcribed from jina-ai/clip-as-service@0341057.

    server/clip_server/model/tokenization.py ``Tokenizer._tokenize`` (the branch for names that are neither
    M-CLIP nor CN-CLIP; ``context_length`` 77 is ``Tokenizer.__call__``'s default, which
    executors/helper.py ``preproc_text`` uses), then ``preproc_text(return_np=True)`` as
    executors/clip_onnx.py calls it: both arrays ``.astype(np.int32)``. The BPE is open_clip's: the same
    vocabulary file and the same cleaning (ftfy, html unescape, whitespace, lower case) as clip_server's
    model/simple_tokenizer.py; its start/end ids are clip_server's ``<|startoftext|>`` / ``<|endoftext|>``.
    """
    bpe = open_clip.tokenizer.SimpleTokenizer()
    sot_token, eot_token = bpe.sot_token_id, bpe.eot_token_id
    all_tokens = [[sot_token, *bpe.encode(text), eot_token] for text in texts]
    input_ids = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    attention_mask = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot_token
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        attention_mask[i, : len(tokens)] = 1
    return {"input_ids": input_ids.cpu().numpy().astype(np.int32),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int32)}


def cas_image_feed(blobs: list[bytes], n_px: int = 224) -> dict[str, np.ndarray]:
    """clip_server's image feed, transcribed from jina-ai/clip-as-service@0341057.

    server/clip_server/model/clip.py ``_transform_blob(n_px)`` (``n_px`` from ``_VISUAL_MODEL_IMAGE_SIZE`` of
    the model name), then executors/helper.py ``preproc_image(return_np=True, dtype='fp32')``: stacked,
    ``.type(torch.float32)``, numpy.
    """
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose([
        lambda blob: Image.open(io.BytesIO(blob)),
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        ToTensor(),
        Normalize(CAS_MEAN, CAS_STD),
    ])
    tensors = torch.stack([transform(blob).detach() for blob in blobs]).type(torch.float32)
    return {"pixel_values": tensors.cpu().numpy()}


def cas_session(path: Path) -> Any:
    """A session as clip_server's executors/clip_onnx.py opens one on CPU: all graph optimisations, no fallback."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    session.disable_fallback()
    return session


def torch_embeddings(model: nn.Module, text: dict[str, np.ndarray], image: dict[str, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        return (model.encode_text(torch.from_numpy(text["input_ids"]).long()).numpy(),  # type: ignore[operator]
                model.encode_image(torch.from_numpy(image["pixel_values"])).numpy())  # type: ignore[operator]


def test_graphs_declare_clip_servers_inputs(cas_artifact: tuple[Path, nn.Module]) -> None:
    import onnx

    root, _ = cas_artifact
    text = ort.InferenceSession(str(root / "clip-text" / "textual.onnx"), providers=["CPUExecutionProvider"])
    vision = ort.InferenceSession(str(root / "clip-vision" / "visual.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in text.get_inputs()] == [
        ("input_ids", "tensor(int32)", ["batch_size", 77]), ("attention_mask", "tensor(int32)", ["batch_size", 77])]
    assert [(i.name, i.type, i.shape) for i in vision.get_inputs()] == [
        ("pixel_values", "tensor(float)", ["batch_size", 3, 224, 224])]
    for session in (text, vision):  # clip_server unpacks exactly one output
        assert [(o.name, o.type) for o in session.get_outputs()] == [("embeddings", "tensor(float)")]
    for path in (root / "clip-text" / "textual.onnx", root / "clip-vision" / "visual.onnx"):
        proto = onnx.load(str(path))
        # clip_server[onnx] pins onnxruntime-gpu <= 1.13.1: opset <= 17, IR version <= 8
        assert proto.ir_version <= export.ONNX_MAX_IR_VERSION
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 17
    report = (root / "metadata.json").read_text()
    assert '"attention_mask"' in report and '"int32"' in report


def test_transcribed_clip_server_feed(cas_artifact: tuple[Path, nn.Module]) -> None:
    """Transcribed contract: clip_server's feed rebuilt from its source, run with its session options."""
    root, model = cas_artifact
    text_feed, image_feed = cas_text_feed(TEXTS), cas_image_feed(image_blobs())
    assert text_feed["input_ids"].shape == (3, 77) and text_feed["attention_mask"].dtype == np.int32
    assert image_feed["pixel_values"].shape == (3, 3, 224, 224) and image_feed["pixel_values"].dtype == np.float32
    (got_text,) = cas_session(root / "clip-text" / "textual.onnx").run(None, text_feed)
    (got_image,) = cas_session(root / "clip-vision" / "visual.onnx").run(None, image_feed)
    want_text, want_image = torch_embeddings(model, text_feed, image_feed)
    assert got_text.shape == (3, 32) and got_image.shape == (3, 32)
    assert np.abs(got_text - want_text).max() <= 1e-4
    assert np.abs(got_image - want_image).max() <= 1e-4
    assert np.abs(got_text[0] - got_text[1]).max() > 1e-3  # the texts are told apart

    # the artifact's own tokenizer and image transform produce the same feed, so kubetune's encode and
    # clip_server agree on the same inputs
    tokens = export.load_tokenizer(root / "clip-text")(TEXTS)
    ours = export.text_feed(tokens, export.pad_token_id(export.load_tokenizer(root / "clip-text")))
    assert np.array_equal(ours["input_ids"].numpy(), text_feed["input_ids"])
    assert np.array_equal(ours["attention_mask"].numpy(), text_feed["attention_mask"])
    transform = export.load_image_transform(root / "clip-vision")
    pixels = torch.stack([transform(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in image_blobs()])
    assert np.abs(pixels.numpy() - image_feed["pixel_values"]).max() <= 1e-6


def test_attention_mask_is_positional() -> None:
    # 0 pads open_clip's BPE and is also the token "!": only the tail after the last real token is padding
    ids = torch.tensor([[49406, 320, 0, 49407, 0, 0], [49406, 0, 0, 0, 0, 49407]])
    assert export.attention_mask(ids, 0).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    hf = torch.tensor([[0, 57, 2, 1, 1], [0, 2, 1, 1, 1]])  # <s> … </s> <pad>: XLM-R pads with 1
    assert export.attention_mask(hf, 1).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert export.attention_mask(hf, 1).dtype == torch.int32


def test_clip_as_service_dir(cas_artifact: tuple[Path, nn.Module], tmp_path: Path) -> None:
    root, _ = cas_artifact
    model_dir = export.clip_as_service_dir(root, tmp_path / "model")
    assert sorted(p.name for p in model_dir.iterdir()) == ["textual.onnx", "visual.onnx"]
    assert sha256_file(model_dir / "textual.onnx") == sha256_file(root / "clip-text" / "textual.onnx")
    with pytest.raises(export.ExportError, match="missing"):
        export.clip_as_service_dir(tmp_path / "nowhere", tmp_path / "other")


def test_sdk_runs_onnx_towers_of_either_signature(cas_artifact: tuple[Path, nn.Module], tmp_path: Path) -> None:
    """``kubetune.get_model(is_onnx=True)`` feeds the graph's declared inputs: clip-as-service's int32 pair, and
    a graph taking int64 ``input_ids`` alone (artifacts written before the pair)."""
    import shutil

    import kubetune

    root, _ = cas_artifact
    texts = TEXTS[:2]
    want = kubetune.encode(kubetune.get_model(root, "clip-text"), texts)
    assert np.abs(kubetune.encode(kubetune.get_model(root, "clip-text", is_onnx=True), texts) - want).max() <= 1e-4

    single = tmp_path / "artifact"
    shutil.copytree(root, single)
    tower = export.load_tower(single / "clip-text")
    ids = torch.ones(2, 77, dtype=torch.long)
    torch.onnx.export(tower, (ids,), str(single / "clip-text" / "textual.onnx"), input_names=["input_ids"],
                      output_names=["embeddings"], dynamic_axes={"input_ids": {0: "batch_size"}},
                      opset_version=17, dynamo=False)
    model = kubetune.get_model(single, "clip-text", is_onnx=True)
    assert [i.type for i in model.module.get_inputs()] == ["tensor(int64)"]
    assert np.abs(kubetune.encode(model, texts) - want).max() <= 1e-4


def _import_clip_server_executor_helper(monkeypatch: pytest.MonkeyPatch) -> Any:
    """clip_server's executors/helper.py, with stand-ins for the docarray 0.21 names it imports at the top.

    ``preproc_text`` / ``preproc_image`` only read ``.texts`` / each document's blob and set ``mime_type``; the
    stand-ins provide that. kubetune's own docarray is back in place once the test ends.
    """
    stub = types.ModuleType("docarray")
    stub.Document = object  # type: ignore[attr-defined]
    stub.DocumentArray = object  # type: ignore[attr-defined]
    distance = types.ModuleType("docarray.math.distance.numpy")
    distance.cosine = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "docarray", stub)
    monkeypatch.setitem(sys.modules, "docarray.math", types.ModuleType("docarray.math"))
    monkeypatch.setitem(sys.modules, "docarray.math.distance", types.ModuleType("docarray.math.distance"))
    monkeypatch.setitem(sys.modules, "docarray.math.distance.numpy", distance)
    monkeypatch.delitem(sys.modules, "clip_server.executors.helper", raising=False)
    import importlib

    return importlib.import_module("clip_server.executors.helper")


class _Docs(list):  # type: ignore[type-arg]
    """The part of a docarray 0.21 DocumentArray that clip_server's preproc_text / preproc_image use."""

    @property
    def texts(self) -> list[str]:
        return [doc.text for doc in self]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, tuple):  # da[:, 'mime_type'] = 'text'
            for doc in self:
                setattr(doc, key[1], value)
        else:
            super().__setitem__(key, value)


def test_clip_server_runs_the_export(cas_artifact: tuple[Path, nn.Module], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """clip_server's own code: CLIPOnnxModel on the model directory, its tokenizer, transform and preproc_*."""
    clip_onnx = pytest.importorskip("clip_server.model.clip_onnx")
    tokenization = pytest.importorskip("clip_server.model.tokenization")
    clip = pytest.importorskip("clip_server.model.clip")
    helper = _import_clip_server_executor_helper(monkeypatch)
    root, model = cas_artifact

    cas_model = clip_onnx.CLIPOnnxModel(CAS_NAME, model_path=str(export.clip_as_service_dir(root, tmp_path / "m")))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cas_model.start_sessions(sess_options=options, providers=["CPUExecutionProvider"], dtype="fp32")
    assert cas_model.image_size == 224

    texts = _Docs(types.SimpleNamespace(text=text) for text in TEXTS)
    _, text_feed = helper.preproc_text(texts, tokenizer=tokenization.Tokenizer(CAS_NAME), return_np=True)
    images = _Docs(types.SimpleNamespace(content=blob, blob=blob, tensor=None, content_type="blob", uri=None)
                   for blob in image_blobs())
    _, image_feed = helper.preproc_image(images, preprocess_fn=clip._transform_blob(cas_model.image_size),
                                         return_np=True, dtype="fp32")
    assert {k: (v.dtype, v.shape) for k, v in text_feed.items()} == {
        "input_ids": (np.int32, (3, 77)), "attention_mask": (np.int32, (3, 77))}
    assert np.array_equal(text_feed["input_ids"], cas_text_feed(TEXTS)["input_ids"])  # the transcription holds
    assert np.array_equal(text_feed["attention_mask"], cas_text_feed(TEXTS)["attention_mask"])
    assert np.abs(image_feed["pixel_values"] - cas_image_feed(image_blobs())["pixel_values"]).max() <= 1e-6

    got_text, got_image = cas_model.encode_text(text_feed), cas_model.encode_image(image_feed)
    want_text, want_image = torch_embeddings(model, text_feed, image_feed)
    assert np.abs(got_text - want_text).max() <= 1e-4
    assert np.abs(got_image - want_image).max() <= 1e-4


def cas_hf_text_feed(tokenizer: Any, texts: list[str], context_length: int = 77) -> dict[str, np.ndarray]:
    """clip_server's text feed for a Hugging Face tokenizer, transcribed from jina-ai/clip-as-service@0341057.

    server/clip_server/model/tokenization.py ``Tokenizer._tokenize``, the M-CLIP branch (``padding=True``:
    padded to the batch's longest text, not to ``context_length``), then executors/helper.py
    ``preproc_text(return_np=True)``: int32.
    """
    result = tokenizer(texts, max_length=context_length, return_attention_mask=True, return_tensors="pt",
                       padding=True, truncation=True)
    return {"input_ids": result["input_ids"].cpu().numpy().astype(np.int32),
            "attention_mask": result["attention_mask"].cpu().numpy().astype(np.int32)}


def test_hf_text_tower_takes_clip_servers_padded_to_longest_feed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Transcribed contract, Hugging Face text tower: the text length axis is dynamic."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_trainer_hf_text import CONTEXT, build_hf_text_dirs, hf_config
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tokenizer_dir, model_dir = build_hf_text_dirs(tmp_path, TEXTS * 4)
    config = hf_config(tokenizer_dir, model_dir)
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"]).eval()
    root = tmp_path / "artifact"
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=CONTEXT)
    export.write_artifact(root, model, "kt-tiny-hf-cas", config, dataclasses.asdict(PreprocessCfg(size=32)),
                          metrics={}, metadata={}, onnx=True, tokenizer=tokenizer)
    session = cas_session(root / "clip-text" / "textual.onnx")
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int32)", ["batch_size", "sequence_length"]),
        ("attention_mask", "tensor(int32)", ["batch_size", "sequence_length"])]
    feed = cas_hf_text_feed(AutoTokenizer.from_pretrained(str(tokenizer_dir)), TEXTS[:2], CONTEXT)
    assert feed["input_ids"].shape[1] < CONTEXT  # padded to the longer of the two texts only
    (got,) = session.run(None, feed)
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(feed["input_ids"]).long()).numpy()
    assert np.abs(got - want).max() <= 1e-4
