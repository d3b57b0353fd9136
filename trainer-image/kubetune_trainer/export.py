"""The artifact: each tower with only its own weights, plus metrics, run metadata and a sha256 manifest.

    artifact/
      manifest.json             {"format": "kubetune-artifact/v1", "files": {path: {"sha256", "size"}}}
      metadata.json             run, model, open_clip config, logit scale/bias, versions, training summary
      metrics.json              {"before": {...}, "after": {...}}
      clip-text/model.safetensors    text-tower weights only (no visual.* key)
      clip-text/config.json          {"model_name", "embed_dim", "text_cfg", "quick_gelu", "custom_text"}
      clip-text/preprocessing.json   tokenizer: kind, context length, HF tokenizer name
      clip-text/textual.onnx         (export.onnx) input_ids [batch, context_length] → normalised embeddings
      clip-vision/model.safetensors  image-tower weights only
      clip-vision/config.json        {"model_name", "embed_dim", "vision_cfg", "quick_gelu"}
      clip-vision/preprocessing.json image size, mean, std, interpolation, resize mode
      clip-vision/visual.onnx        (export.onnx) pixel_values [batch, 3, H, W] → normalised embeddings

The artifact event's ``sha256`` is the sha256 of ``manifest.json``, which in turn pins every other file.
``textual.onnx`` / ``visual.onnx`` are the file names clip-as-service's ONNX runtime loads from one model
directory: putting the two side by side gives its layout. ``metadata.json["onnx"]`` records each file's input
and output names, opset and the verified max |torch − onnxruntime|.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "kubetune-artifact/v1"
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path) -> tuple[str, int, int]:
    """Write manifest.json for every file under ``root``; returns (sha256 of it, total bytes, file count)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
    total = sum(f["size"] for f in files.values()) + manifest.stat().st_size
    return sha256_file(manifest), total, len(files) + 1


def verify_manifest(root: Path) -> list[str]:
    """Problems found (missing, extra or changed files); empty when the artifact is intact."""
    manifest = json.loads((root / "manifest.json").read_text())
    problems = []
    listed = manifest.get("files", {})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    for name in sorted(present - set(listed)):
        problems.append(f"{name}: not in the manifest")
    for name, entry in sorted(listed.items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: size or sha256 differs")
    return problems


def _json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")


def tokenizer_info(config: Mapping[str, Any], context_length: int) -> dict[str, Any]:
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        return {"kind": "hf", "hf_tokenizer_name": text_cfg["hf_tokenizer_name"], "context_length": context_length,
                **({"tokenizer_kwargs": text_cfg["tokenizer_kwargs"]} if text_cfg.get("tokenizer_kwargs") else {})}
    return {"kind": "open_clip", "context_length": context_length}


def write_artifact(root: Path, model: nn.Module, model_name: str, config: Mapping[str, Any],
                   preprocess_cfg: Mapping[str, Any], metrics: Mapping[str, Any], metadata: Mapping[str, Any],
                   onnx: bool = False, context_length: int | None = None) -> tuple[str, int, int]:
    """Write the artifact directory; returns (manifest sha256, total size, file count).

    ``context_length`` is the tokenizer's (what training used); by default the model's. They differ for Hugging
    Face text towers, where open_clip's ``model.context_length`` is the encoder's ``max_position_embeddings``.
    """
    from safetensors.torch import save_file

    text, vision, rest = split_state_dict(model.state_dict())
    custom_text = hasattr(model, "text")
    if context_length is None:
        context_length = int(getattr(model, "context_length", config.get("text_cfg", {}).get("context_length", 77)))
    save_file(text, str(_mkdir(root / TEXT_DIR) / WEIGHTS), metadata={"format": FORMAT, "tower": "text"})
    save_file(vision, str(_mkdir(root / VISION_DIR) / WEIGHTS), metadata={"format": FORMAT, "tower": "vision"})
    common = {"model_name": model_name, "embed_dim": config["embed_dim"], "quick_gelu": config.get("quick_gelu", False)}
    _json(root / TEXT_DIR / "config.json", {**common, "text_cfg": config["text_cfg"], "custom_text": custom_text})
    _json(root / VISION_DIR / "config.json", {**common, "vision_cfg": config["vision_cfg"]})
    _json(root / TEXT_DIR / "preprocessing.json", tokenizer_info(config, context_length))
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
        module = _build_text_tower(config["embed_dim"], text_cfg, config.get("quick_gelu", False))
    elif "vision_cfg" in config:
        module = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    else:
        raise ExportError(f"{tower_dir}: config.json has neither text_cfg nor vision_cfg")
    state = load_file(str(tower_dir / WEIGHTS))
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


def load_tokenizer(text_dir: str | Path) -> Callable[..., torch.Tensor]:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    info = json.loads((Path(text_dir) / "preprocessing.json").read_text())
    if info.get("kind") == "hf":
        return HFTokenizer(info["hf_tokenizer_name"], context_length=info["context_length"],
                           **info.get("tokenizer_kwargs", {}))
    return SimpleTokenizer(context_length=info["context_length"])


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
ONNX_OPSET = 18
ONNX_INPUTS = {TEXT_DIR: "input_ids", VISION_DIR: "pixel_values"}
ONNX_OUTPUT = "embeddings"


class _Normalized(nn.Module):
    """A tower followed by L2 normalisation: what ``encode_text`` / ``encode_image(normalize=True)`` return."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(x), dim=-1)


class _Encode(nn.Module):
    """``model.encode_text`` or ``model.encode_image`` with ``normalize=True`` (the reference for verification)."""

    def __init__(self, model: nn.Module, text: bool) -> None:
        super().__init__()
        self.model = model
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_text if self.text else self.model.encode_image
        return encode(x, normalize=True)  # type: ignore[operator]


def onnx_examples(model: nn.Module, preprocess_cfg: Mapping[str, Any], context_length: int,
                  batch: int = 2) -> dict[str, torch.Tensor]:
    """Example inputs per tower: random token ids (static length ``context_length``) and random pixels."""
    size = preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(0)
    text_module = getattr(model, "text", model)
    vocab = int(getattr(text_module, "vocab_size", 0) or getattr(model, "vocab_size", 0) or 1000)
    pad = int(getattr(getattr(text_module, "config", None), "pad_token_id", None) or 0)
    tokens = torch.randint(1, max(2, vocab - 1), (batch, context_length), generator=generator)
    tokens[tokens == pad] = pad + 1 if pad + 1 < vocab else max(pad - 1, 0)
    tokens[:, -(context_length // 3):] = pad  # padded tails, as real tokenised captions have
    return {TEXT_DIR: tokens, VISION_DIR: torch.randn(batch, 3, height, width, generator=generator)}


def export_onnx(root: Path, model: nn.Module, preprocess_cfg: Mapping[str, Any], context_length: int,
                opset: int = ONNX_OPSET) -> dict[str, dict[str, Any]]:
    """Export each tower, built from the artifact's own files, to ONNX and verify it with onnxruntime.

    ``clip-text/textual.onnx`` maps ``input_ids`` (int64, [batch, context_length]: the length is static) and
    ``clip-vision/visual.onnx`` maps ``pixel_values`` (float32, [batch, 3, H, W]) to L2-normalised
    ``embeddings``; the batch axis is dynamic. Each file is checked against the trained model's own
    ``encode_text`` / ``encode_image(normalize=True)`` on a batch size other than the export's, so both the
    tower split and the export are verified (|Δ| ≤ 1e-4, else :class:`ExportError`).
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
            tower = _Normalized(load_tower(root / tower_name)).float().eval()
            path = root / tower_name / file_name
            name = ONNX_INPUTS[tower_name]
            with torch.no_grad():
                torch.onnx.export(tower, (examples[tower_name],), str(path), input_names=[name],
                                  output_names=[ONNX_OUTPUT],
                                  dynamic_axes={name: {0: "batch_size"}, ONNX_OUTPUT: {0: "batch_size"}},
                                  opset_version=opset, dynamo=False)
            reference: nn.Module = _Encode(model, text=tower_name == TEXT_DIR).eval()
            if reference_dtype != torch.float32:  # bf16 weights: compare with the fp32 tower instead
                reference = tower
            worst = verify_onnx(reference, path, checks[tower_name])
            report[tower_name] = {"file": f"{tower_name}/{file_name}", "input": name, "output": ONNX_OUTPUT,
                                  "opset": opset, "max_abs_diff": worst, "tolerance": ONNX_TOLERANCE}
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return report


def verify_onnx(module: nn.Module, path: Path, example: torch.Tensor) -> float:
    """Max |torch − onnxruntime| on ``example``; raises ExportError above the tolerance."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    device = next(module.parameters()).device
    with torch.no_grad():
        expected = module(example.to(device)).float().cpu().numpy()
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"{path.name}: onnxruntime output shape {got.shape} != torch {expected.shape}")
    worst = float(abs(expected - got).max())
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by {worst:.2e} > {ONNX_TOLERANCE}")
    return worst
