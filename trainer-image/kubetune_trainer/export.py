"""The artifact: each tower with only its own weights, plus metrics, run metadata and a sha256 manifest.

    artifact/
      manifest.json             {"format": "kubetune-artifact/v1", "files": {path: {"sha256", "size"}}}
      metadata.json             run, model, open_clip config, logit scale/bias, versions, training summary
      metrics.json              {"before": {...}, "after": {...}}
      clip-text/model.safetensors    text-tower weights only (no visual.* key)
      clip-text/config.json          {"model_name", "embed_dim", "text_cfg", "quick_gelu", "custom_text"}
      clip-text/preprocessing.json   tokenizer: kind, context length, HF tokenizer name
      clip-text/hf/                  (Hugging Face text towers) the encoder's config and the tokenizer's files
      clip-text/textual.onnx         (export.onnx) input_ids, attention_mask int32 [batch, length] → embeddings
      clip-vision/model.safetensors  image-tower weights only
      clip-vision/config.json        {"model_name", "embed_dim", "vision_cfg", "quick_gelu"}
      clip-vision/preprocessing.json image size, mean, std, interpolation, resize mode
      clip-vision/visual.onnx        (export.onnx) pixel_values float32 [batch, 3, H, W] → embeddings

The artifact event's ``sha256`` is the sha256 of ``manifest.json``, which in turn pins every other file
(:mod:`kubetune.storage.artifact` writes and verifies it, for the trainer and the SDK alike).
Each tower directory loads on its own, offline, wherever it is copied: a Hugging Face text tower's
``hf_model_name`` and ``hf_tokenizer_name`` name its own ``hf/`` directory (relative to the tower), never the
hub or a path of the machine that trained it.
The ONNX towers follow clip-as-service's ONNX runtime (``clip_server.executors.clip_onnx``): its
``model_path`` is a directory holding ``textual.onnx`` and ``visual.onnx`` side by side
(:func:`clip_as_service_dir` makes one from an artifact), it feeds the text graph int32 ``input_ids`` and
``attention_mask`` and the vision graph float32 ``pixel_values``, and it returns each graph's single output as
the embedding, unnormalised (cosine ranking is unaffected). ``metadata.json["onnx"]`` records each file's inputs
(name, dtype, shape), output, opset and the verified difference from torch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kubetune.storage.artifact import FORMAT, write_manifest
from torch import nn

from .tokenization import make_tokenizer, tokenizer_info

TEXT_DIR = "clip-text"
VISION_DIR = "clip-vision"
WEIGHTS = "model.safetensors"
ONNX_TEXT = "textual.onnx"
ONNX_VISION = "visual.onnx"
MODEL_LEVEL_KEYS = ("logit_scale", "logit_bias")
ONNX_TOLERANCE = 1e-4


class ExportError(Exception):
    pass


def split_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                               dict[str, torch.Tensor]]:
    """(text, vision, model-level) parts of a CLIP / CustomTextCLIP state dict, with tower prefixes removed.

    The text part's keys are those of open_clip's text tower module (``TextTransformer`` or ``HFTextEncoder``),
    the vision part's those of ``model.visual``.
    """
    text, vision, rest = {}, {}, {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        if key.startswith("visual."):
            vision[key[len("visual."):]] = tensor
        elif key.startswith("text."):
            text[key[len("text."):]] = tensor
        elif key in MODEL_LEVEL_KEYS:
            rest[key] = tensor
        else:  # CLIP keeps its text tower's modules at the top level
            text[key] = tensor
    return text, vision, rest


def _json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")


HF_DIR = "hf"  # inside clip-text/: the Hugging Face encoder config and tokenizer files


def _save_hf_files(text_dir: Path, model: nn.Module, tokenizer: Any, text_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Write a Hugging Face text tower's encoder config and tokenizer files into ``text_dir/hf`` (from the
    objects in memory: no download) and return ``text_cfg`` pointing at that directory."""
    text_cfg = dict(text_cfg)
    encoder = getattr(getattr(model, "text", None), "transformer", None)
    if text_cfg.get("hf_model_name") and encoder is not None:
        encoder.config.save_pretrained(_mkdir(text_dir / HF_DIR))
        text_cfg["hf_model_name"] = HF_DIR
    if text_cfg.get("hf_tokenizer_name"):
        hf_tokenizer = getattr(tokenizer, "tokenizer", None)
        if hf_tokenizer is None:
            raise ExportError("the model has a Hugging Face tokenizer but none was given to write into the artifact")
        hf_tokenizer.save_pretrained(_mkdir(text_dir / HF_DIR))
        text_cfg["hf_tokenizer_name"] = HF_DIR
    return text_cfg


def _local(tower_dir: Path, name: str) -> str:
    """An ``hf_*_name`` of an artifact: its own directory when it names one, else (older artifacts) as written."""
    return str(tower_dir / name) if name and (tower_dir / name).is_dir() else name


def write_artifact(root: Path, model: nn.Module, model_name: str, config: Mapping[str, Any],
                   preprocess_cfg: Mapping[str, Any], metrics: Mapping[str, Any], metadata: Mapping[str, Any],
                   onnx: bool = False, context_length: int | None = None,
                   tokenizer: Any = None) -> tuple[str, int, int]:
    """Write the artifact directory; returns (manifest sha256, total size, file count).

    ``context_length`` is the tokenizer's (what training used); by default the model's. They differ for Hugging
    Face text towers, where open_clip's ``model.context_length`` is the encoder's ``max_position_embeddings``.
    ``tokenizer`` (the one training used) is needed for a Hugging Face tokenizer, whose files are copied in.
    """
    from safetensors.torch import save_file

    text, vision, rest = split_state_dict(model.state_dict())
    custom_text = hasattr(model, "text")
    if context_length is None:
        context_length = int(getattr(model, "context_length", config.get("text_cfg", {}).get("context_length", 77)))
    save_file(text, str(_mkdir(root / TEXT_DIR) / WEIGHTS), metadata={"format": FORMAT, "tower": "text"})
    save_file(vision, str(_mkdir(root / VISION_DIR) / WEIGHTS), metadata={"format": FORMAT, "tower": "vision"})
    common = {"model_name": model_name, "embed_dim": config["embed_dim"], "quick_gelu": config.get("quick_gelu", False)}
    text_cfg = _save_hf_files(root / TEXT_DIR, model, tokenizer, config["text_cfg"])
    _json(root / TEXT_DIR / "config.json", {**common, "text_cfg": text_cfg, "custom_text": custom_text})
    _json(root / VISION_DIR / "config.json", {**common, "vision_cfg": config["vision_cfg"]})
    _json(root / TEXT_DIR / "preprocessing.json", tokenizer_info({"text_cfg": text_cfg}, context_length))
    _json(root / VISION_DIR / "preprocessing.json", dict(preprocess_cfg))
    _json(root / "metrics.json", dict(metrics))
    scalars = {k: v.float().flatten().tolist() for k, v in rest.items()}
    onnx_report = export_onnx(root, model, preprocess_cfg, context_length) if onnx else None
    _json(root / "metadata.json", {**metadata, "format": FORMAT, "model_name": model_name,
                                   "model_config": dict(config), "model_scalars": scalars,
                                   **({"onnx": onnx_report} if onnx_report else {})})
    return write_manifest(root)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ loading back
def load_tower(tower_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build one tower from its directory alone (its own config and weights): ``clip-text`` or ``clip-vision``.

    The returned module maps tokens (text) or pixel tensors (vision) to un-normalised embeddings.
    """
    from open_clip.model import _build_text_tower, _build_vision_tower
    from safetensors.torch import load_file

    tower_dir = Path(tower_dir)
    config = json.loads((tower_dir / "config.json").read_text())
    if "text_cfg" in config:
        text_cfg = dict(config["text_cfg"])
        if text_cfg.get("hf_model_name"):  # the weights come from this directory: no hub download of the base
            text_cfg["hf_model_pretrained"] = False
            text_cfg["hf_model_name"] = _local(tower_dir, text_cfg["hf_model_name"])
        module = _build_text_tower(config["embed_dim"], text_cfg, config.get("quick_gelu", False))
    elif "vision_cfg" in config:
        module = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    else:
        raise ExportError(f"{tower_dir}: config.json has neither text_cfg nor vision_cfg")
    state = load_file(str(tower_dir / WEIGHTS))
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


def load_tokenizer(text_dir: str | Path) -> Callable[..., torch.Tensor]:
    """The tokenizer training used, from the tower's ``preprocessing.json`` (and its ``hf/`` files)."""
    info = json.loads((Path(text_dir) / "preprocessing.json").read_text())
    if info.get("kind") == "hf":
        info["hf_tokenizer_name"] = _local(Path(text_dir), str(info["hf_tokenizer_name"]))
    return make_tokenizer(info)


def load_image_transform(vision_dir: str | Path) -> Callable[[Any], torch.Tensor]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = json.loads((Path(vision_dir) / "preprocessing.json").read_text())
    fields = set(PreprocessCfg.__dataclass_fields__)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def load_artifact_state_dict(root: str | Path) -> dict[str, torch.Tensor]:
    """Re-assemble a full model state dict from an artifact (to continue training from it)."""
    from safetensors.torch import load_file

    root = Path(root)
    text_config = json.loads((root / TEXT_DIR / "config.json").read_text())
    text = load_file(str(root / TEXT_DIR / WEIGHTS))
    vision = load_file(str(root / VISION_DIR / WEIGHTS))
    prefix = "text." if text_config.get("custom_text") else ""
    state = {f"{prefix}{k}": v for k, v in text.items()}
    state.update({f"visual.{k}": v for k, v in vision.items()})
    scalars = json.loads((root / "metadata.json").read_text()).get("model_scalars", {})
    for key, values in scalars.items():
        state[key] = torch.tensor(values, dtype=torch.float32).reshape(() if len(values) == 1 else (-1,))
    return state


# ------------------------------------------------------------------------------------------------ ONNX
# The contract is clip-as-service's ONNX runtime (clip_server 0.8.3 = jina-ai/clip-as-service@0341057):
# model/clip_onnx.py loads <model_path>/textual.onnx and <model_path>/visual.onnx and returns each session's
# single output unchanged; executors/helper.py feeds the text graph int32 input_ids + attention_mask
# [batch, length] and the vision graph float32 pixel_values [batch, 3, n_px, n_px]. Its onnx extra pins
# onnxruntime(-gpu) <= 1.13.1, which reads opset <= 17 and IR version <= 8.
ONNX_OPSET = 17
ONNX_MAX_IR_VERSION = 8
ONNX_OUTPUT = "embeddings"
# onnxruntime's type strings → numpy dtype names
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64"}


def _kept(unused: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``unused``: adding it keeps that input in the exported graph.

    The TorchScript exporter drops inputs nothing reads, and onnxruntime rejects a feed that names an input the
    graph lacks; clip-as-service feeds ``attention_mask`` to every text graph.
    """
    return (unused.sum() * 0).to(like.dtype)


class _TextGraph(nn.Module):
    """The text tower behind clip-as-service's text inputs: int32 ``input_ids`` and ``attention_mask``.

    The mask is accepted and not used. open_clip's ``TextTransformer`` needs none: its attention is causal and
    it pools at the EOT token, so the padding after EOT never reaches the embedding. ``HFTextEncoder`` derives
    its mask from the ids (``input_ids != pad_token_id``), which is the mask a Hugging Face tokenizer returns
    for a right-padded batch; it keeps doing so here, so the graph computes what the tower computed in training
    (taking the fed mask instead would mean re-implementing the encoder's forward and pooling).
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower(input_ids.long())  # embedding tables index with int64
        return embeddings + _kept(attention_mask, embeddings)


class _VisionGraph(nn.Module):
    """The image tower behind clip-as-service's image input: float32 ``pixel_values``."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)


class _Encode(nn.Module):
    """The trained model's ``encode_text`` / ``encode_image`` on a graph's feed: the reference for verification."""

    def __init__(self, model: nn.Module, text: bool) -> None:
        super().__init__()
        self.model = model
        self.text = text

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.text:
            return self.model.encode_text(inputs[0].long())  # type: ignore[operator]
        return self.model.encode_image(inputs[0])  # type: ignore[operator]


def attention_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """int32, 1 up to and including each row's last non-pad token and 0 after: what clip-as-service feeds.

    By position rather than ``input_ids != pad_id``: open_clip's BPE tokenizer pads with 0, which is also a
    real token ("!").
    """
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    last = torch.where(input_ids != pad_id, positions, -1).amax(dim=-1, keepdim=True)
    return (positions <= last).to(torch.int32)


def text_feed(input_ids: torch.Tensor, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The text graph's inputs for a batch of token ids, with clip-as-service's names and dtypes."""
    return {"input_ids": input_ids.to(torch.int32), "attention_mask": attention_mask(input_ids, pad_id)}


def pad_token_id(tokenizer: Any) -> int:
    """The id a tokenizer pads with: a wrapped Hugging Face tokenizer's own, else 0 (open_clip's BPE)."""
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def onnx_examples(model: nn.Module, preprocess_cfg: Mapping[str, Any], context_length: int, batch: int = 2,
                  length: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Example feeds per tower: random token ids with padded tails (``length``, by default ``context_length``,
    tokens) and random pixels, named and typed as each graph takes them."""
    size = preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    length = length or context_length
    generator = torch.Generator().manual_seed(0)
    text_module = getattr(model, "text", model)
    vocab = int(getattr(text_module, "vocab_size", 0) or getattr(model, "vocab_size", 0) or 1000)
    pad = int(getattr(getattr(text_module, "config", None), "pad_token_id", None) or 0)
    tokens = torch.randint(1, max(2, vocab - 1), (batch, length), generator=generator)
    tokens[tokens == pad] = pad + 1 if pad + 1 < vocab else max(pad - 1, 0)
    tokens[:, -(length // 3):] = pad  # padded tails, as real tokenised captions have
    return {TEXT_DIR: text_feed(tokens, pad),
            VISION_DIR: {"pixel_values": torch.randn(batch, 3, height, width, generator=generator)}}


def _hf_text_tower(tower_dir: Path) -> bool:
    return bool(json.loads((tower_dir / "config.json").read_text()).get("text_cfg", {}).get("hf_model_name"))


def export_onnx(root: Path, model: nn.Module, preprocess_cfg: Mapping[str, Any], context_length: int,
                opset: int = ONNX_OPSET) -> dict[str, dict[str, Any]]:
    """Export each tower, built from the artifact's own files, to ONNX and verify it with onnxruntime.

    ``clip-text/textual.onnx`` takes ``input_ids`` and ``attention_mask`` (int32, [batch, context_length]) and
    ``clip-vision/visual.onnx`` takes ``pixel_values`` (float32, [batch, 3, H, W]); each has the one output
    ``embeddings`` (float32, [batch, embed_dim]), not normalised, as open_clip's ``encode_text`` /
    ``encode_image`` and clip-as-service's torch runtime return them. The batch axis is dynamic; the text
    length is static for open_clip text towers (their causal mask and positions are built for exactly
    ``context_length`` tokens) and dynamic for Hugging Face ones (clip-as-service pads Hugging Face tokenised
    text to the batch's longest). Each file is checked against the trained model's own ``encode_*`` on a batch
    size other than the export's (and another length where it is dynamic), so both the tower split and the
    export are verified (:func:`verify_onnx`, else :class:`ExportError`).
    """
    was_training = model.training
    model.eval()
    reference_dtype = next(model.parameters()).dtype
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's eval fast path (aten::_native_multi_head_attention) has no ONNX symbolic
    torch.backends.mha.set_fastpath_enabled(False)
    report: dict[str, dict[str, Any]] = {}
    try:
        examples = onnx_examples(model, preprocess_cfg, context_length)
        checks = onnx_examples(model, preprocess_cfg, context_length, batch=3)
        for tower_name, file_name in ((TEXT_DIR, ONNX_TEXT), (VISION_DIR, ONNX_VISION)):
            text = tower_name == TEXT_DIR
            tower = load_tower(root / tower_name).float().eval()
            graph: nn.Module = (_TextGraph(tower) if text else _VisionGraph(tower)).eval()
            dynamic_length = text and _hf_text_tower(root / tower_name)
            path = root / tower_name / file_name
            _export_graph(graph, examples[tower_name], path, opset, dynamic_length)
            # bf16 weights: compare with the fp32 tower instead
            reference = _Encode(model, text).eval() if reference_dtype == torch.float32 else graph
            feeds = [checks[tower_name]]
            if dynamic_length:
                short = max(4, context_length // 2)
                feeds.append(onnx_examples(model, preprocess_cfg, context_length, batch=3, length=short)[tower_name])
            session = _session(path)
            diffs = [_verify(session, reference, feed, path.name) for feed in feeds]
            report[tower_name] = {"file": f"{tower_name}/{file_name}", "inputs": onnx_inputs(session),
                                  "output": ONNX_OUTPUT, "normalized": False, "opset": opset,
                                  "max_abs_diff": max(d[0] for d in diffs), "max_rel_diff": max(d[1] for d in diffs),
                                  "tolerance": ONNX_TOLERANCE}
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return report


def _export_graph(graph: nn.Module, feed: Mapping[str, torch.Tensor], path: Path, opset: int,
                  dynamic_length: bool) -> None:
    axes: dict[str, dict[int, str]] = {name: {0: "batch_size"} for name in feed}
    if dynamic_length:
        for name in feed:
            axes[name][1] = "sequence_length"
    axes[ONNX_OUTPUT] = {0: "batch_size"}
    with torch.no_grad():
        torch.onnx.export(graph, tuple(feed.values()), str(path), input_names=list(feed),
                          output_names=[ONNX_OUTPUT], dynamic_axes=axes, opset_version=opset, dynamo=False)


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_inputs(session: Any) -> dict[str, dict[str, Any]]:
    """The graph's inputs as the file declares them: {name: {"dtype": "int32", "shape": ["batch_size", 77]}}."""
    return {i.name: {"dtype": ORT_DTYPES.get(i.type, i.type), "shape": list(i.shape)} for i in session.get_inputs()}


def verify_onnx(module: nn.Module, path: Path, feed: Mapping[str, torch.Tensor]) -> float:
    """Max |torch − onnxruntime| relative to each embedding's norm, on ``feed`` (the graph's inputs by name).

    ``module`` takes the feed's tensors in order. Raises :class:`ExportError` when the graph's inputs are not
    the feed's names and dtypes, when it has other than one output, or above the tolerance.
    """
    return _verify(_session(path), module, feed, path.name)[1]


def _verify(session: Any, module: nn.Module, feed: Mapping[str, torch.Tensor], name: str) -> tuple[float, float]:
    """(max absolute, max norm-relative) difference between ``module`` and the onnxruntime ``session``.

    The tolerance applies to the relative one, |Δ| / ‖torch row‖: the outputs are not normalised, and what a
    consumer compares (cosine, ranks) depends on the error against the embedding's length, not its raw size.
    """
    declared = {i.name: ORT_DTYPES.get(i.type, i.type) for i in session.get_inputs()}
    given = {key: str(value.numpy().dtype) for key, value in feed.items()}
    if declared != given:
        raise ExportError(f"{name}: the graph takes {declared}, the feed is {given}")
    if len(session.get_outputs()) != 1:  # clip-as-service unpacks exactly one output
        raise ExportError(f"{name}: {len(session.get_outputs())} outputs, expected 1")
    device = next(module.parameters()).device
    with torch.no_grad():
        expected = module(*(value.to(device) for value in feed.values())).float().cpu().numpy()
    (got,) = session.run(None, {key: value.numpy() for key, value in feed.items()})
    if got.shape != expected.shape:
        raise ExportError(f"{name}: onnxruntime output shape {got.shape} != torch {expected.shape}")
    delta = abs(expected - got)
    norms = np.maximum(np.linalg.norm(expected, axis=-1, keepdims=True), 1e-12)
    worst, relative = float(delta.max()), float((delta / norms).max())
    if not relative <= ONNX_TOLERANCE:
        raise ExportError(f"{name}: onnxruntime differs from torch by {relative:.2e} of the embedding norm "
                          f"> {ONNX_TOLERANCE}")
    return worst, relative


def clip_as_service_dir(root: str | Path, dest: str | Path) -> Path:
    """``dest`` as a clip-as-service ``model_path``: the artifact's ``textual.onnx`` and ``visual.onnx`` side by side.

    Hard links where the file system allows (the files can be gigabytes), copies otherwise.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for tower, file_name in ((TEXT_DIR, ONNX_TEXT), (VISION_DIR, ONNX_VISION)):
        source = Path(root) / tower / file_name
        if not source.is_file():
            raise ExportError(f"{source}: missing; export the artifact with ONNX (spec.export.onnx: true)")
        target = dest / file_name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return dest
