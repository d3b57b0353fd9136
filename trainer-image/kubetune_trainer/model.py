"""Build the open_clip model, its transforms and tokenizer from ``spec.model``.

- a built-in name (+ pretrained tag, downloaded from the hub when the cluster has internet);
- a custom config (``spec.model.config``) registered under ``spec.model.name`` with ``open_clip.add_model_config``
  (a tiny model for tests; a Hugging Face text tower whose ``hf_model_name`` is a local directory);
- starting weights (``spec.model.weights``): a .pt/.pth/.bin/.safetensors state dict (local path, s3:// or
  http(s)://), or a kubetune artifact directory (its two towers merged back), always ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from kubetune.api.spec import ModelSpec
from torch import nn

from .cache import write_atomically
from .tokenization import TokenizerUnavailable, make_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# The SigLIP paper's initialisation of the sigmoid loss's temperature and bias (t = 10, b = −10): with b = −10
# the many negatives of a batch start near σ = 0, so the first steps are not spent pushing them down.
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


class ModelError(Exception):
    """The model cannot be built as specified (permanent: bad config)."""


@dataclass
class ModelBundle:
    model: nn.Module
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    config: dict[str, Any]  # the open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    preprocess_cfg: dict[str, Any]  # image size, mean, std, interpolation, resize mode

    @property
    def context_length(self) -> int:
        """The tokenizer's context length (for HF text towers ``model.context_length`` is the encoder's
        ``max_position_embeddings``, not what the tokenizer pads to)."""
        length = getattr(self.tokenizer, "context_length", None)
        return int(length if length is not None else getattr(self.model, "context_length", 77))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → amp_bf16 on a CUDA GPU that supports bf16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "amp_bf16"
    return "fp32"


def register_config(name: str, config: dict[str, Any], config_dir: Path) -> None:
    """Make ``name`` resolve to ``config`` in open_clip's registry (through a JSON file, its public API)."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", name):
        raise ModelError(f"spec.model.name {name!r}: a custom config name may only hold letters, digits, . _ + -")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ModelError(f"spec.model.config lacks {', '.join(missing)}")
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{name}.json"
    # the DDP ranks of a pod register into one directory: a rank must never read another's half-written file
    write_atomically(path, json.dumps(config, indent=1, sort_keys=True).encode(), prefix=f".{name}.")
    open_clip.add_model_config(path)


def model_config(name: str) -> dict[str, Any]:
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelError(f"unknown open_clip model {name!r} (and no spec.model.config given)")
    return dict(config)


def is_artifact_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "clip-text").is_dir() and (path / "clip-vision").is_dir()


def build(spec: ModelSpec, device: torch.device, precision: str, work_dir: Path,
          weights_path: Path | None = None) -> ModelBundle:
    """Create the model on ``device``; ``weights_path`` is ``spec.model.weights`` already made local."""
    if spec.config is not None:
        register_config(spec.name, spec.config, work_dir / "model-configs")
    config = model_config(spec.name)
    pretrained_text = hf_text_weights(spec, config, has_weights=weights_path is not None)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, precision=precision_for_weights(precision), device=device,
            output_dict=True, weights_only=True, pretrained_text=pretrained_text, cache_dir=str(work_dir / "hub"))
    except RuntimeError as exc:
        if "pretrained" in str(exc).lower() or "unknown" in str(exc).lower():
            raise ModelError(f"cannot create {spec.name} (pretrained={spec.pretrained}): {exc}") from None
        raise
    if weights_path is not None:
        load_weights(model, weights_path)
    try:
        tokenizer = make_tokenizer(tokenizer_info(config), cache_dir=work_dir / "hub")
    except TokenizerUnavailable as exc:
        raise ModelError(str(exc)) from None
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=tokenizer, name=spec.name, config=config, preprocess_cfg=preprocess_cfg)


def hf_text_weights(spec: ModelSpec, config: dict[str, Any], has_weights: bool) -> bool:
    """Whether a Hugging Face text tower starts from its Hugging Face weights.

    Only a question when no CLIP weights (a pretrained tag or ``weights``) will fill it: then the config must say
    (``text_cfg.hf_model_pretrained``), because the alternative, a randomly initialised text encoder, trains
    without complaint and retrieves nothing.
    """
    text_cfg = config.get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    if not name or spec.pretrained or has_weights:
        return False
    asked = text_cfg.get("hf_model_pretrained")
    if asked is None:
        raise ModelError(
            f"spec.model: the text tower of {spec.name} is the Hugging Face model {name} and no CLIP weights are "
            f"given (spec.model.pretrained or weights), so it would start from a random init: set "
            f"text_cfg.hf_model_pretrained in spec.model.config to true to start from {name}'s own weights, or to "
            f"false for a random init")
    return bool(asked)


def add_sigmoid_bias(model: nn.Module) -> bool:
    """Give a model without a logit bias (every CLIP checkpoint) the SigLIP paper's temperature and bias, so that
    the sigmoid loss can train it; a model that has one (SigLIP checkpoints, configs with ``init_logit_bias``)
    keeps both. Returns whether they were set. The bias is a parameter: trained, checkpointed and exported."""
    if getattr(model, "logit_bias", None) is not None:
        return False
    scale = model.logit_scale
    assert isinstance(scale, torch.Tensor)
    with torch.no_grad():
        scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
    model.logit_bias = nn.Parameter(torch.full((), SIGLIP_INIT_LOGIT_BIAS, dtype=scale.dtype, device=scale.device))
    return True


def precision_for_weights(precision: str) -> str:
    """The dtype open_clip keeps the weights in: pure bf16 for ``bf16``, fp32 for fp32 and the amp modes."""
    return "bf16" if precision == "bf16" else "fp32"


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state-dict file (open_clip's loader, weights_only) or a kubetune artifact directory."""
    if path.is_dir():
        if not is_artifact_dir(path):
            raise ModelError(f"{path}: a weights directory must be a kubetune artifact (manifest.json, clip-*/)")
        from .export import load_artifact_state_dict

        state = load_artifact_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if k not in ("logit_bias",)]
        if real_missing or unexpected:
            raise ModelError(f"{path}: artifact does not match the model (missing {real_missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        return
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: weights must be one of {', '.join(WEIGHT_SUFFIXES)} or an artifact directory")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a pickled object: never run code from a bucket
        first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise ModelError(f"{path}: cannot load weights: refused, the file holds pickled objects besides tensors "
                         f"(loaded with weights_only=True): {first}") from None
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load weights: {str(exc)[:300]}") from None
