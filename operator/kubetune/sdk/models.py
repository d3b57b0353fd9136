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

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.errors import ArtifactCorrupt, ArtifactMissing, ConfigInvalid, MissingExtra, StorageUnavailable

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
    try:
        found = mismatches(root, listed_files(root))
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not the manifest's shape
        raise ArtifactCorrupt(f"{root / 'manifest.json'}: not a kubetune manifest ({type(exc).__name__})",
                              "re-download the artifact: `kubetune artifact pull NAME DIR`") from None
    return [f"{name}: missing" if missing else f"{name}: size or sha256 differs from the manifest"
            for name, missing in found]


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
              device: str = "cpu", *, token: str | None = None, batch_size: int | None = None,
              logging_level: str | None = None) -> Model:
    """Load one tower of an artifact: ``select_model`` is ``'clip-text'`` or ``'clip-vision'``.

    Finetuner's ``batch_size`` and ``logging_level`` are accepted and have no effect (``encode`` takes the batch
    size); its ``token`` is refused, there being no cloud to pull from.
    """
    if token is not None:
        raise ConfigInvalid("get_model(token=...): kubetune artifacts are local directories, not Jina AI Cloud ids",
                            "download it first: artifact = run.save_artifact('clip-model'); then get_model(artifact)")
    if select_model not in (TEXT, VISION):
        raise ConfigInvalid(f"select_model must be {TEXT!r} or {VISION!r}, got {select_model!r}")
    root = artifact_root(artifact)
    tower = root / select_model
    config_path = tower / "config.json"
    if not config_path.is_file():
        raise ArtifactCorrupt(f"{tower}: missing config.json", "re-download the artifact: `kubetune artifact pull`")
    _require("open_clip", "trainer", "loading a model")  # tokenizer and transforms come from open_clip
    if not is_onnx:
        _check_device(device)
    from kubetune_trainer import export
    from kubetune_trainer.tokenization import TokenizerUnavailable

    try:
        config = json.loads(config_path.read_text())
        embed_dim = int(config["embed_dim"])
        preprocess = export.load_tokenizer(tower) if select_model == TEXT else export.load_image_transform(tower)
    except TokenizerUnavailable as exc:  # an artifact written before tokenizers were copied into it
        raise ArtifactCorrupt(f"{tower}: {exc}", "re-export it with this kubetune version, which copies the "
                              "tokenizer into the artifact") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise _unreadable(tower, exc) from None
    if is_onnx:
        path = tower / ONNX_FILES[select_model]
        if not path.is_file():
            raise ArtifactMissing(f"{path}: this artifact has no ONNX export",
                                  "fine-tune with to_onnx=True (spec.export.onnx: true)")
        ort = _require("onnxruntime", "onnx", "ONNX inference")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base but Exception
            raise _unreadable(tower, exc) from None
        return Model(select_model, root, True, session, preprocess, embed_dim)
    from safetensors import SafetensorError

    try:  # on the CPU first: a failure here is the artifact's, not the device's
        module = export.load_tower(tower, "cpu")
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError, export.ExportError) as exc:
        raise _unreadable(tower, exc) from None
    return Model(select_model, root, False, module.to(device), preprocess, embed_dim, device)


def _unreadable(tower: Path, exc: BaseException) -> ArtifactCorrupt:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return ArtifactCorrupt(f"{tower}: cannot load it ({detail})",
                           f"check it: `kubetune artifact verify {tower.parent}`; re-download or re-export it")


def _check_device(device: str) -> None:
    """:class:`ConfigInvalid` for a device torch cannot use on this machine, before any weights are read."""
    import torch

    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigInvalid(f"device {device!r}: not a torch device ({type(exc).__name__})",
                            "use 'cpu', 'cuda' or 'cuda:N'") from None
    if wanted.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigInvalid(f"device {device!r}: no CUDA GPU is usable on this machine",
                                "use device='cpu' (or a machine with an NVIDIA GPU, its driver and a CUDA build "
                                "of torch)")
        if wanted.index is not None and wanted.index >= count:
            raise ConfigInvalid(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                f"cuda:{count - 1}", "pick one of them, or device='cpu'")
    elif wanted.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigInvalid(f"device {device!r}: Apple's MPS is not available on this machine", "use device='cpu'")


# ---------------------------------------------------------------------------------------------- encode
def _doc_items(data: Any, kind: str) -> tuple[list[Any], list[Any]] | None:
    """(what to encode, the documents it came from) for kubetune's ``Document``/``DocumentArray`` or a docarray
    ``DocList``/``Document`` (``.text``; ``.tensor``, ``.blob``, ``.uri``...); None for other data. A document with
    nothing to encode is named by its index."""
    from kubetune.sdk.documents import Document, is_documents

    if is_documents(data):
        docs = [data] if isinstance(data, Document) else list(data)
        fields: tuple[str, ...] = ("text",) if kind == TEXT else ("tensor", "blob", "uri")
    elif type(data).__module__.startswith("docarray"):
        from docarray import BaseDoc

        docs = [data] if isinstance(data, BaseDoc) else list(data)
        fields = ("text",) if kind == TEXT else ("tensor", "blob", "bytes_", "url", "uri")
    else:
        return None
    items = []
    for i, doc in enumerate(docs):
        value = next((v for v in (getattr(doc, f, None) for f in fields) if v is not None and not (
            isinstance(v, str) and not v)), None)
        if value is None:
            if kind == TEXT:
                raise ConfigInvalid(f"data[{i}] has no text to encode with clip-text",
                                    "encode image documents with select_model='clip-vision'")
            raise ConfigInvalid(f"data[{i}] has no image: no {', '.join(fields[:-1])} or {fields[-1]} to encode "
                                "with clip-vision",
                                "encode text documents with select_model='clip-text'")
        items.append(value)
    return items, docs


def _fill(data: Any, docs: Sequence[Any], embeddings: Any) -> Any:
    """Set each document's ``.embedding``. A kubetune DocumentArray comes back itself, as Finetuner's encode
    returned its input; anything else as the (N, D) array."""
    from kubetune.sdk.documents import DocumentArray

    for doc, row in zip(docs, embeddings if docs else (), strict=True):
        with contextlib.suppress(AttributeError, ValueError, TypeError):  # a docarray schema without embedding
            doc.embedding = row
    return data if isinstance(data, DocumentArray) else embeddings


def _open_image(item: Any) -> Any:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, bytes | bytearray):
        return _decode_image(bytes(item), "image bytes")
    if hasattr(item, "shape") and hasattr(item, "dtype"):  # numpy array / tensor, HWC uint8 or float in [0,1]
        import numpy as np

        array = np.asarray(item.detach().cpu() if hasattr(item, "detach") else item)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW → HWC
        if array.dtype != np.uint8:  # floats in [0, 1] are scaled, larger ones taken as 0-255 (as the trainer does)
            scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image.fromarray(array).convert("RGB")
    uri = str(item)
    if uri.startswith("data:"):
        from kubetune.sdk.documents import read_uri

        return _decode_image(read_uri(uri), "a data: URI")
    if uri.startswith(("http://", "https://", "s3://")):
        return _decode_image(_fetch(uri), uri)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigInvalid(f"{path}: no such image file", "check the path (a relative one is relative to the "
                            "current directory)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigInvalid(f"{path}: cannot read it ({exc.strerror})", "check the file's permissions") from None
    return _decode_image(data, str(path))


def _decode_image(data: bytes, source: str) -> Any:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        what = "an empty file" if not data else "not an image (or a truncated one)"
        raise ConfigInvalid(f"{source}: {what}", "pass PNG, JPEG, GIF, BMP, WebP or TIFF images") from None


def _fetch(uri: str) -> bytes:
    """The bytes at an http(s):// or s3:// URI: :class:`ConfigInvalid` for a bad URI or a missing object,
    :class:`StorageUnavailable` for a host that cannot be reached."""
    if uri.startswith("s3://"):
        from kubetune.storage import ObjectNotFound, RetryPolicy, StoreError, StoreUnavailable, parse_s3_uri, s3_store

        bad_uri = ConfigInvalid(f"{uri}: not an s3://BUCKET/KEY URI", "e.g. s3://my-bucket/images/cat.jpg")
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError:
            raise bad_uri from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not key:
            raise bad_uri
        if not endpoint:
            raise ConfigInvalid(f"{uri}: no S3 endpoint known", "set AWS_ENDPOINT_URL_S3=http(s)://host:port")
        try:  # interactive: a short retry window, not the trainer's two minutes
            return s3_store(endpoint, bucket, retry=RetryPolicy.for_window(5)).get_bytes(key)
        except ValueError as exc:  # the endpoint is not a URL
            raise ConfigInvalid(f"{uri}: {exc}", "set AWS_ENDPOINT_URL_S3=http(s)://host:port") from None
        except ObjectNotFound:
            raise ConfigInvalid(f"{uri}: no such object", "check the bucket and the key") from None
        except StoreUnavailable as exc:
            raise StorageUnavailable(f"{uri}: {exc}", f"is {endpoint} reachable from here?") from None
        except StoreError as exc:
            raise StorageUnavailable(f"{uri}: {exc}", "check the bucket exists and the credentials "
                                     "(AWS_ACCESS_KEY_ID...)") from None
    import http.client
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri, timeout=30) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:  # the server answered
        if exc.code < 500:
            raise ConfigInvalid(f"{uri}: HTTP {exc.code} {exc.reason}", "check the URL") from None
        raise StorageUnavailable(f"{uri}: HTTP {exc.code} {exc.reason}", "the server failed; try again later") from None
    except (ValueError, http.client.InvalidURL) as exc:  # a malformed host, port or IPv6 address
        raise ConfigInvalid(f"{uri}: not a valid URL ({exc})", "check the URL") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, a garbled answer
        raise StorageUnavailable(f"{uri}: cannot fetch it ({getattr(exc, 'reason', exc)})",
                                 "check the URL and that this machine reaches its host") from None


def encode(model: Model, data: Any, batch_size: int = 64) -> Any:
    """Embed ``data`` with one tower into L2-normalised float32 rows.

    ``data``: for clip-text a string or a list of strings; for clip-vision image paths, file:// / http(s) /
    s3:// / data: URIs, PIL images, bytes or numpy arrays (HWC uint8 or float in [0, 1], or CHW); or, for either,
    documents: kubetune's ``Document``/``DocumentArray`` or a docarray ``DocList``/``Document`` (``.text``;
    ``.tensor``, ``.blob``, ``.uri``...), whose ``.embedding`` is set.

    Returns the (N, D) numpy array, except for a kubetune ``DocumentArray``, which is returned itself with its
    embeddings set (``docs.embeddings`` is the array), as Finetuner's ``encode`` did.
    """
    import numpy as np

    found = _doc_items(data, model.kind)
    docs: list[Any] = []
    if found is not None:
        items, docs = found
    else:
        if isinstance(data, str | bytes | os.PathLike) or (hasattr(data, "shape") and getattr(data, "ndim", 0) == 3):
            items = [data]
        elif hasattr(data, "shape") and getattr(data, "ndim", 0) == 4:
            items = list(data)
        else:
            items = list(data) if isinstance(data, Iterable) else [data]
    if not items:
        return _fill(data, docs, np.zeros((0, model.embed_dim), dtype=np.float32))
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
    return _fill(data, docs, embeddings / np.maximum(norms, 1e-12))


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
    """Backbones to start from (``spec.model.name`` + ``spec.model.pretrained``), as dicts; ``default`` is true
    for the tag a name alone starts from (:data:`kubetune.api.models.DEFAULT_TAGS`).

    With ``all_pretrained=True`` every (name, tag) pair open_clip knows (needs the trainer extra).
    """
    from kubetune.api.models import default_tag

    if all_pretrained:
        open_clip = _require("open_clip", "trainer", "listing all open_clip models")
        return [{"name": n, "pretrained": t, "default": default_tag(n) == t, "embed_dim": None, "params": None,
                 "description": ""} for n, t in open_clip.list_pretrained()]
    return [{**b.__dict__, "default": default_tag(b.name) == b.pretrained} for b in BACKBONES]
