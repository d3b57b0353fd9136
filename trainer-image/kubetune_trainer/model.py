"""Build the open_clip model, its transforms and tokenizer from ``spec.model``.

What the model starts from (:func:`kubetune.api.models.resolve_pretrained` decides, this module fetches):

- a pretrained tag (``spec.model.pretrained``, or the name's default tag when it is unset): the weights come from
  the model mirror (``KUBETUNE_MODEL_MIRROR``: ``<mirror>/<NAME>/<TAG>/``, sha256-checked against its manifest)
  when it has them, else from the hub through open_clip (its Hugging Face cache first). An unreachable hub is
  one probe, not minutes of retries: the error names the mirror and the hub;
- starting weights (``spec.model.weights``): a .pt/.pth/.bin/.safetensors state dict (local path, s3:// or
  http(s)://), or a kubetune artifact directory (its two towers merged back; its model name and config when the
  spec leaves them unset), always ``weights_only=True``;
- a random init (``pretrained: random``, or a custom config with neither).

A custom config (``spec.model.config``) is registered under ``spec.model.name`` with ``open_clip.add_model_config``
(a tiny model for tests; a Hugging Face text tower whose ``hf_model_name`` is a local directory). Weights that do
not fit the model are one sentence naming both, never PyTorch's state-dict dump.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from kubetune.api.errors import ArtifactCorrupt, ArtifactMissing, StorageUnavailable
from kubetune.api.events import shown_uri
from kubetune.api.models import DEFAULT_NAME, WEIGHT_SUFFIXES, mirror_key
from kubetune.api.spec import ModelSpec, OutputSpec
from kubetune.storage import (
    MANIFEST,
    RetryPolicy,
    Store,
    StoreUnavailable,
    download_artifact,
    listed_files,
    sha256_file,
    store_from_uri,
)
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from .cache import shared_dir, write_atomically
from .tokenization import TokenizerUnavailable, make_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

# The SigLIP paper's initialisation of the sigmoid loss's temperature and bias (t = 10, b = −10): with b = −10
# the many negatives of a batch start near σ = 0, so the first steps are not spent pushing them down.
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0
HUB_PROBE_SECONDS = 5.0


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
    # what the model started from, for the artifact's metadata.json: name, pretrained (the tag actually used, or
    # None), and where the weights came from (uri + sha256 of a tag's file and the mirror it was in, or the
    # weights URI)
    start: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        """The tokenizer's context length (for HF text towers ``model.context_length`` is the encoder's
        ``max_position_embeddings``, not what the tokenizer pads to)."""
        length = getattr(self.tokenizer, "context_length", None)
        return int(length if length is not None else getattr(self.model, "context_length", 77))


def weights_source(start: dict[str, Any]) -> str:
    """Where the starting weights came from, in words, from :attr:`ModelBundle.start`."""
    if start.get("random_init"):
        return "random init"
    return shown_uri(str(start.get("from") or start.get("weights") or ""))


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


@dataclass(frozen=True)
class ArtifactModel:
    """The model an artifact holds, from its metadata.json."""

    name: str
    config: dict[str, Any]


def artifact_model(root: Path) -> ArtifactModel | None:
    """The name and open_clip config an artifact was trained as; None when its metadata does not say."""
    try:
        meta = json.loads((root / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    name, config = meta.get("model_name"), meta.get("model_config")
    if not isinstance(name, str) or not isinstance(config, dict):
        return None
    return ArtifactModel(name, config)


def describe_config(config: dict[str, Any]) -> str:
    """A model config in a few words: ``embed_dim 32, vision 2×64 patch 8 at 32 px, text 2×32``."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision.get("timm_model_name"):
        seen = f"timm {vision['timm_model_name']}"
    else:
        patch = f" patch {vision['patch_size']}" if vision.get("patch_size") else ""
        seen = f"{vision.get('layers')}×{vision.get('width')}{patch} at {vision.get('image_size')} px"
    read = text.get("hf_model_name") or f"{text.get('layers')}×{text.get('width')}"
    return f"embed_dim {config.get('embed_dim')}, vision {seen}, text {read}"


def mirror_store(uri: str | None, output: OutputSpec) -> Store | None:
    """The model mirror (``KUBETUNE_MODEL_MIRROR``) on the run's S3 endpoint, with its credentials and retries."""
    if not uri:
        return None
    try:
        return store_from_uri(uri, endpoint=output.endpoint, region=output.region,
                              retry=RetryPolicy.for_window(output.retry_seconds))
    except ValueError as exc:
        raise ModelError(f"the model mirror {uri}: {exc}") from None


def build(spec: ModelSpec, device: torch.device, precision: str, work_dir: Path,
          weights_path: Path | None = None, mirror: Store | None = None) -> ModelBundle:
    """Create the model on ``device``; ``weights_path`` is ``spec.model.weights`` already made local, ``mirror``
    the model mirror (:func:`mirror_store`)."""
    name, custom = spec.name, spec.config
    artifact = artifact_model(weights_path) if weights_path is not None and is_artifact_dir(weights_path) else None
    if artifact is not None and custom is None and name in (DEFAULT_NAME, artifact.name):
        # the spec did not say which model: the artifact's weights only fit the model it was trained as
        name, custom = artifact.name, artifact.config
        log.info("model: %s, as the artifact %s was trained", name, spec.weights)
    if custom is not None:
        register_config(name, custom, work_dir / "model-configs")
    config = model_config(name)
    tag = spec.pretrained_tag()
    start: dict[str, Any] = {"name": name, "pretrained": tag}
    tag_file, tag_cfg = None, {}
    if tag is not None:
        tag_file, start["from"] = pretrained_file(name, tag, mirror, work_dir)
        if mirror is not None and start["from"].startswith(mirror.uri() + "/"):
            start["mirror"] = mirror.uri()  # where a report rebuilds this start without the hub
        start["sha256"] = sha256_file(tag_file)
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        warn_activation(name, tag, tag_cfg, config)
    elif weights_path is not None:
        start["weights"] = spec.weights
    else:
        start["random_init"] = True
    pretrained_text = hf_text_weights(name, config, has_clip_weights=tag_file is not None or weights_path is not None)
    try:
        # the tag's own preprocessing (mean, std, interpolation, resize mode), as open_clip applies it for a tag
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, precision=precision_for_weights(precision), device=device, output_dict=True,
            weights_only=True, pretrained_text=pretrained_text, cache_dir=str(work_dir / "hub"),
            image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
    except RuntimeError as exc:
        if "unknown" in str(exc).lower() or "not found" in str(exc).lower():
            raise ModelError(f"cannot create {name}: {exc}") from None
        raise
    target = f"spec.model's {name} ({describe_config(config)})"
    if tag_file is not None:
        load_weights(model, tag_file, target)
        log.info("model: %s, pretrained %s from %s", name, tag, start["from"])
    elif weights_path is not None:
        load_weights(model, weights_path, target, artifact)
        if artifact is not None and name != artifact.name:
            differ = config_differences(config, artifact.config)
            if differ:  # the tensors fit, the function would not: an activation, a norm, a pooling
                raise ModelError(f"spec.model.weights: the artifact {spec.weights} holds a {artifact.name} whose "
                                 f"tensors fit {target} but whose config differs in {', '.join(differ[:4])}: leave "
                                 f"spec.model.name and config unset to continue as {artifact.name}, or give its "
                                 f"config")
        log.info("model: %s, starting from %s", name, spec.weights)
    else:
        log.info("model: %s, random init", name)
    try:
        tokenizer = make_tokenizer(tokenizer_info(config), cache_dir=work_dir / "hub")
    except TokenizerUnavailable as exc:
        raise ModelError(str(exc)) from None
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=tokenizer, name=name, config=config, preprocess_cfg=preprocess_cfg, start=start)


def pretrained_file(name: str, tag: str, mirror: Store | None, work_dir: Path) -> tuple[Path, str]:
    """The local weights file of NAME::TAG and where it came from: the mirror if it has it (sha256-checked), else
    the Hugging Face cache, else the hub."""
    key = mirror_key(name, tag)
    if mirror is None:
        mirror_said = "no model mirror is configured (Helm value runDefaults.models.mirror)"
    elif key is None:
        mirror_said = f"{name}::{tag} cannot be a key of the model mirror {mirror.uri()}"
    else:
        found = from_mirror(mirror.child(key), work_dir / "mirror" / f"{name}--{tag}")
        if found is not None:
            return found
        mirror_said = f"the model mirror {mirror.uri()} has no {key}/{MANIFEST}"
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelError(f"spec.model.pretrained: open_clip has no tag {tag!r} for {name} (its tags: {known}) and "
                         f"{mirror_said}")
    cache_dir = work_dir / "hub"
    cached = hub_cached(cfg, cache_dir)
    if cached is not None:
        return cached, f"the Hugging Face cache ({cached})"
    endpoint, problem = hub_problem()
    if problem is not None:
        raise ModelError(f"cannot get the weights of {name}::{tag}: {mirror_said}, and the hub {endpoint} is "
                         f"unreachable ({problem}); on a cluster without internet, stage them into a mirror: "
                         f"`kubetune models stage {name}::{tag} s3://BUCKET/models` and set "
                         f"runDefaults.models.mirror")
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir))
    except Exception as exc:  # huggingface_hub's and urllib's errors share no base below Exception
        raise ModelError(f"cannot download the weights of {name}::{tag} from {endpoint}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    if not path:
        raise ModelError(f"open_clip names no download for {name}::{tag}")
    return Path(path), f"{endpoint} ({cfg.get('hf_hub') or cfg.get('url')})"


def from_mirror(entry: Store, target: Path) -> tuple[Path, str] | None:
    """The weights file under one mirror entry (``<mirror>/NAME/TAG``), downloaded once per pod and verified
    against the entry's manifest; None when the mirror has no such entry."""
    uri = entry.uri()
    if not entry.exists(MANIFEST):
        return None

    def fill(into: Path) -> bool:
        try:
            download_artifact(entry, into, None, uri)
        except ArtifactCorrupt as exc:
            raise ModelError(f"the model mirror's {exc.message}: stage it again") from None
        except ArtifactMissing as exc:
            raise ModelError(f"the model mirror's {exc.message}: stage it again") from None
        except StorageUnavailable as exc:
            raise StoreUnavailable(exc.message) from None
        return True

    local = shared_dir(target, uri, fill)
    assert local is not None  # fill never reports "nothing there"
    files = [name for name in listed_files(local) if Path(name).suffix in WEIGHT_SUFFIXES]
    if len(files) != 1:
        raise ModelError(f"the model mirror's {uri} must hold one weights file ({', '.join(WEIGHT_SUFFIXES)}), it "
                         f"lists {len(files)}: stage it again")
    return local / files[0], f"{uri}/{files[0]}"


def hub_cached(cfg: dict[str, Any], cache_dir: Path) -> Path | None:
    """The tag's file if the Hugging Face cache already has it (an offline re-run needs no hub)."""
    from huggingface_hub import try_to_load_from_cache

    model_id, filename = os.path.split(str(cfg.get("hf_hub") or ""))
    if not model_id:
        return None
    filename = filename or HF_WEIGHTS_NAME
    # the files open_clip's download_pretrained_from_hf asks for, in its order: a .safetensors twin first
    stem, suffix = os.path.splitext(filename)
    candidates = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else (
        [stem + ".safetensors"] if suffix in (".bin", ".pth") else [])
    for candidate in [*candidates, filename]:
        found = try_to_load_from_cache(model_id, candidate, cache_dir=str(cache_dir))
        if isinstance(found, str):
            return Path(found)
    return None


def hub_problem() -> tuple[str, str | None]:
    """(the hub's endpoint, why it cannot be reached or None). One request with a short timeout: the
    downloader itself retries a dead endpoint for half a minute per file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        return endpoint, "HF_HUB_OFFLINE is set"
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except Exception as exc:  # the HTTP client's connection and timeout errors
        return endpoint, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return endpoint, None


def warn_activation(name: str, tag: str, tag_cfg: dict[str, Any], config: dict[str, Any]) -> None:
    """open_clip's own warning for a tag trained with another activation than the config's (it is silent when
    handed a file, as the mirror's weights are)."""
    trained, built = bool(tag_cfg.get("quick_gelu", False)), bool(config.get("quick_gelu", False))
    if tag_cfg and trained != built:
        log.warning("%s::%s was trained with quick_gelu=%s but the %s config has quick_gelu=%s: the model starts "
                    "off worse than the tag's (%s-quickgelu matches it)", name, tag, trained, name, built,
                    name.removesuffix("-quickgelu"))


def hf_text_weights(name: str, config: dict[str, Any], has_clip_weights: bool) -> bool:
    """Whether a Hugging Face text tower starts from its Hugging Face weights.

    Only a question when no CLIP weights (a pretrained tag or ``weights``) will fill it: then the config must say
    (``text_cfg.hf_model_pretrained``), because the alternative, a randomly initialised text encoder, trains
    without complaint and retrieves nothing.
    """
    text_cfg = config.get("text_cfg", {})
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name or has_clip_weights:
        return False
    asked = text_cfg.get("hf_model_pretrained")
    if asked is None:
        raise ModelError(
            f"spec.model: the text tower of {name} is the Hugging Face model {hf_name} and no CLIP weights are "
            f"given (spec.model.pretrained or weights), so it would start from a random init: set "
            f"text_cfg.hf_model_pretrained in spec.model.config to true to start from {hf_name}'s own weights, or "
            f"to false for a random init")
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


def load_weights(model: nn.Module, path: Path, target: str = "the model",
                 artifact: ArtifactModel | None = None) -> None:
    """Load a state-dict file (open_clip's loader, weights_only) or a kubetune artifact directory.

    ``target`` names the model in errors, ``artifact`` what an artifact directory says it holds: weights that do
    not fit are one sentence naming both.
    """
    if path.is_dir():
        if not is_artifact_dir(path):
            raise ModelError(f"{path}: a weights directory must be a kubetune artifact (manifest.json, clip-*/)")
        from .export import load_artifact_state_dict

        state = load_artifact_state_dict(path)
        own = model.state_dict()
        differ = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        missing = [k for k in own if k not in state and k != "logit_bias"]
        unexpected = [k for k in state if k not in own]
        if differ or missing or unexpected:
            held = f"a {artifact.name} ({describe_config(artifact.config)})" if artifact else "another model"
            hint = f"leave spec.model.name and config unset to continue as {artifact.name}" if artifact else \
                "set spec.model.name and config to the model it was trained as"
            raise ModelError(f"spec.model.weights: the artifact {path} holds {held}, which does not fit {target} "
                             f"({_mismatch(own, state, differ, missing, unexpected)}): {hint}")
        model.load_state_dict(state, strict=False)
        return
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: weights must be one of {', '.join(WEIGHT_SUFFIXES)} or an artifact directory")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a pickled object: never run code from a bucket
        first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise ModelError(f"{path}: cannot load weights: refused, the file holds pickled objects besides tensors "
                         f"(loaded with weights_only=True): {first}") from None
    except RuntimeError as exc:
        raise ModelError(f"{path}: these weights do not fit {target} ({_summarise_load_error(str(exc))})") from None
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load weights: {str(exc)[:300]}") from None


def config_differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two open_clip model configs, with both values. Pure."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key} ({b} in the artifact, {a} here)")
    return out


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], differ: list[str], missing: list[str],
              unexpected: list[str]) -> str:
    parts = []
    if differ:
        first = differ[0]
        parts.append(f"{len(differ)} tensors differ in shape, e.g. {first} {tuple(state[first].shape)} in the "
                     f"weights, {tuple(own[first].shape)} in the model")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _summarise_load_error(text: str) -> str:
    """PyTorch's ``load_state_dict`` report (one line per tensor) as a count and one example."""
    sizes = _SIZE_MISMATCH.findall(text)
    parts = []
    if sizes:
        key, theirs, ours = sizes[0]
        parts.append(f"{len(sizes)} tensors differ in shape, e.g. {key} {theirs} in the weights, {ours} in the "
                     f"model")
    for label in ("Missing key(s)", "Unexpected key(s)"):
        found = re.search(re.escape(label) + r" in state_dict: ([^.]*)\.", text)
        if found:
            keys = [k.strip().strip('"') for k in found.group(1).split(",")]
            parts.append(f"{len(keys)} {label.split()[0].lower()}, e.g. {keys[0]}")
    return "; ".join(parts) or text.splitlines()[0][:300]
