"""Inference on an artifact: ``get_model`` loads one tower, ``encode`` turns texts or images into embeddings.

    artifact = run.save_artifact("clip-model")                # or a local run's kubetune-runs/NAME/artifact
    text_model = kubetune.get_model(artifact, select_model="clip-text")
    image_model = kubetune.get_model(artifact, select_model="clip-vision")
    kubetune.encode(text_model, ["a red circle on a white background"])     # (1, D) float32, L2-normalised
    kubetune.encode(image_model, ["photo.png", "s3://bucket/key.jpg"])

Each tower is built from its own directory alone (its config, its weights, its preprocessing), so a search
service can ship just ``clip-text`` or just ``clip-vision``. With ``is_onnx=True`` the ONNX export runs with
onnxruntime (no torch needed). Torch, open_clip and onnxruntime are imported on first use only.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.errors import ArtifactCorrupt, ArtifactMissing, ConfigInvalid, MissingExtra

TEXT = "clip-text"
VISION = "clip-vision"
ONNX_FILES = {TEXT: "textual.onnx", VISION: "visual.onnx"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _require(module: str, extra: str, feature: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(feature, extra, module) from None


def artifact_root(artifact: str | os.PathLike[str]) -> Path:
    """The artifact directory: ``artifact`` itself, or its ``artifact/`` child (a local run directory)."""
    root = Path(artifact).expanduser()
    if not (root / "manifest.json").is_file() and (root / "artifact" / "manifest.json").is_file():
        root = root / "artifact"
    if not root.is_dir():
        raise ArtifactMissing(f"{root}: no such artifact directory",
                              "pass the directory run.save_artifact() returned, or kubetune-runs/NAME/artifact")
    if not (root / "manifest.json").is_file():
        raise ArtifactMissing(f"{root}: not a kubetune artifact (no manifest.json)",
                              "the artifact is complete only once manifest.json exists; re-download it")
    return root


def verify_artifact(artifact: str | os.PathLike[str]) -> list[str]:
    """Problems with the artifact's files against its manifest (sha256 + size); empty when intact."""
    from kubetune.storage import listed_files, mismatches

    root = artifact_root(artifact)
    return [f"{name}: missing" if missing else f"{name}: size or sha256 differs from the manifest"
            for name, missing in mismatches(root, listed_files(root))]


@dataclass
class Model:
    """One loaded tower: ``kind`` is clip-text or clip-vision; ``embed`` maps a batch to embeddings."""

    kind: str
    artifact: Path
    is_onnx: bool
    module: Any  # torch module or onnxruntime session
    preprocess: Callable[[Any], Any]  # tokenizer (text) or image transform (vision)
    embed_dim: int
    device: str = "cpu"

    def __repr__(self) -> str:
        return f"Model({self.kind!r}, {str(self.artifact)!r}, onnx={self.is_onnx}, dim={self.embed_dim})"


def get_model(artifact: str | os.PathLike[str], select_model: str = TEXT, is_onnx: bool = False,
              device: str = "cpu") -> Model:
    """Load one tower of an artifact: ``select_model`` is ``'clip-text'`` or ``'clip-vision'``."""
    if select_model not in (TEXT, VISION):
        raise ConfigInvalid(f"select_model must be {TEXT!r} or {VISION!r}, got {select_model!r}")
    root = artifact_root(artifact)
    tower = root / select_model
    config_path = tower / "config.json"
    if not config_path.is_file():
        raise ArtifactCorrupt(f"{tower}: missing config.json", "re-download the artifact: `kubetune artifact pull`")
    config = json.loads(config_path.read_text())
    _require("open_clip", "trainer", "loading a model")  # tokenizer and transforms come from open_clip
    from kubetune_trainer import export
    from kubetune_trainer.tokenization import TokenizerUnavailable

    try:
        preprocess = export.load_tokenizer(tower) if select_model == TEXT else export.load_image_transform(tower)
    except TokenizerUnavailable as exc:  # an artifact written before tokenizers were copied into it
        raise ArtifactCorrupt(f"{tower}: {exc}", "re-export it with this kubetune version, which copies the "
                              "tokenizer into the artifact") from None
    if is_onnx:
        path = tower / ONNX_FILES[select_model]
        if not path.is_file():
            raise ArtifactMissing(f"{path}: this artifact has no ONNX export",
                                  "fine-tune with to_onnx=True (spec.export.onnx: true)")
        ort = _require("onnxruntime", "onnx", "ONNX inference")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return Model(select_model, root, True, session, preprocess, int(config["embed_dim"]))
    module = export.load_tower(tower, device)
    return Model(select_model, root, False, module, preprocess, int(config["embed_dim"]), device)


# ---------------------------------------------------------------------------------------------- encode
def _doc_items(data: Any, kind: str) -> list[Any] | None:
    """Texts or images out of a docarray DocList/Document (``text`` / ``tensor`` / ``blob`` / ``uri``)."""
    if not type(data).__module__.startswith("docarray"):
        return None
    from docarray import BaseDoc

    docs = [data] if isinstance(data, BaseDoc) else list(data)
    items = []
    for doc in docs:
        if kind == TEXT:
            text = getattr(doc, "text", None)
            if text is None:
                raise ConfigInvalid("a document has no .text to encode with clip-text")
            items.append(text)
        else:
            for attr in ("tensor", "blob", "bytes_", "url", "uri"):
                value = getattr(doc, attr, None)
                if value is not None:
                    items.append(value)
                    break
            else:
                raise ConfigInvalid("a document has no tensor, blob, bytes_, url or uri to encode with clip-vision")
    return items


def _open_image(item: Any) -> Any:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, bytes | bytearray):
        return Image.open(io.BytesIO(item)).convert("RGB")
    if hasattr(item, "shape") and hasattr(item, "dtype"):  # numpy array / tensor, HWC uint8 or float in [0,1]
        import numpy as np

        array = np.asarray(item.detach().cpu() if hasattr(item, "detach") else item)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW → HWC
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image.fromarray(array).convert("RGB")
    uri = str(item)
    if uri.startswith(("http://", "https://", "s3://")):
        from kubetune.storage import store_from_uri

        if uri.startswith("s3://"):
            bucket_store = store_from_uri(uri.rsplit("/", 1)[0])
            data = bucket_store.get_bytes(uri.rsplit("/", 1)[1])
        else:
            import urllib.request

            with urllib.request.urlopen(uri, timeout=30) as response:
                data = response.read()
        return Image.open(io.BytesIO(data)).convert("RGB")
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigInvalid(f"{path}: no such image file")
    with Image.open(path) as image:
        return image.convert("RGB")


def encode(model: Model, data: Any, batch_size: int = 64) -> Any:
    """Embed ``data`` with one tower; returns an (N, D) float32 numpy array of L2-normalised rows.

    ``data``: for clip-text a string or a list of strings; for clip-vision image paths, file:// / http(s) /
    s3:// URIs, PIL images, bytes or numpy arrays (HWC uint8 or float in [0, 1], or CHW); or, for either,
    a docarray ``DocList``/``Document`` (``.text``; ``.tensor``, ``.blob``, ``.url`` or ``.uri``).
    """
    import numpy as np

    items = _doc_items(data, model.kind)
    if items is None:
        if isinstance(data, str | bytes | os.PathLike) or (hasattr(data, "shape") and getattr(data, "ndim", 0) == 3):
            items = [data]
        elif hasattr(data, "shape") and getattr(data, "ndim", 0) == 4:
            items = list(data)
        else:
            items = list(data) if isinstance(data, Iterable) else [data]
    if not items:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    if model.kind == TEXT:
        bad = [type(x).__name__ for x in items if not isinstance(x, str)]
        if bad:
            raise ConfigInvalid(f"clip-text encodes strings, got {bad[0]}", "use select_model='clip-vision' for images")
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        out.append(_encode_batch(model, chunk))
    embeddings = np.concatenate(out, axis=0).astype(np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def _encode_batch(model: Model, chunk: Sequence[Any]) -> Any:
    import torch

    if model.kind == TEXT:
        batch = model.preprocess(list(chunk))
    else:
        batch = torch.stack([model.preprocess(_open_image(item)) for item in chunk])
    if model.is_onnx:
        return _run_onnx(model, batch)
    with torch.no_grad():
        return model.module(batch.to(model.device)).float().cpu().numpy()


def _run_onnx(model: Model, batch: Any) -> Any:
    """Run an ONNX tower on a preprocessed batch, fed as the graph declares its inputs (names and dtypes).

    Text graphs take clip-as-service's int32 ``input_ids`` + ``attention_mask``; feeding by the declared
    inputs also runs artifacts whose text graph takes int64 ``input_ids`` alone.
    """
    from kubetune_trainer import export

    session = model.module
    if model.kind == TEXT:
        values = export.text_feed(batch, export.pad_token_id(model.preprocess))
    else:
        values = {"pixel_values": batch}
    feed = {}
    for graph_input in session.get_inputs():
        dtype = export.ORT_DTYPES.get(graph_input.type)
        if graph_input.name not in values or dtype is None:
            raise ArtifactCorrupt(f"{model.artifact / model.kind}: the ONNX graph takes {graph_input.name} "
                                  f"({graph_input.type}), which kubetune does not feed",
                                  "re-export the artifact with this kubetune version")
        feed[graph_input.name] = values[graph_input.name].numpy().astype(dtype)
    return session.run(None, feed)[0]


# ---------------------------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class Backbone:
    name: str
    pretrained: str
    embed_dim: int
    params: str
    description: str


BACKBONES: tuple[Backbone, ...] = (
    Backbone("ViT-B-32", "laion2b_s34b_b79k", 512, "151M", "English; the usual starting point, fast"),
    Backbone("ViT-B-32", "openai", 512, "151M", "English; OpenAI's original CLIP weights"),
    Backbone("ViT-B-16", "laion2b_s34b_b88k", 512, "150M", "English; finer patches, better on small details"),
    Backbone("ViT-B-16", "datacomp_xl_s13b_b90k", 512, "150M", "English; DataComp-XL, strong zero-shot"),
    Backbone("ViT-L-14", "laion2b_s32b_b82k", 768, "428M", "English; large, needs a GPU with ≥ 24 GB for training"),
    Backbone("ViT-H-14", "laion2b_s32b_b79k", 1024, "986M", "English; huge, multi-GPU (resources.gpus > 1)"),
    Backbone("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", 512, "366M", "multilingual text tower"),
    Backbone("convnext_base_w", "laion2b_s13b_b82k", 640, "180M", "English; ConvNeXt image tower"),
    Backbone("RN50", "openai", 1024, "102M", "English; ResNet-50 image tower"),
)


def describe_models(all_pretrained: bool = False) -> list[dict[str, Any]]:
    """Backbones to start from (``spec.model.name`` + ``spec.model.pretrained``), as dicts.

    With ``all_pretrained=True`` every (name, tag) pair open_clip knows (needs the trainer extra).
    """
    if all_pretrained:
        open_clip = _require("open_clip", "trainer", "listing all open_clip models")
        return [{"name": n, "pretrained": t, "embed_dim": None, "params": None, "description": ""}
                for n, t in open_clip.list_pretrained()]
    return [dict(b.__dict__) for b in BACKBONES]
