"""The text tokenizer, chosen by the model config (or an artifact's record of it), never by the model's name.

``open_clip.get_tokenizer(name)`` gives any name containing "siglip" the hub's SigLIP sentencepiece tokenizer
whatever its config says; every built-in open_clip config names its Hugging Face tokenizer in
``text_cfg.hf_tokenizer_name`` anyway, so the config alone is enough to decide, and a custom config called
``siglip-tiny`` keeps the tokenizer its vocabulary was built for. The same description is written into the
artifact (``clip-text/preprocessing.json``), so training and loading build the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONTEXT_LENGTH = 77


class TokenizerUnavailable(Exception):
    """The tokenizer must come from the Hugging Face hub and cannot be fetched (permanent for this run)."""


def tokenizer_info(config: Mapping[str, Any], context_length: int | None = None) -> dict[str, Any]:
    """What builds the tokenizer of ``config`` (an open_clip model config): JSON-serialisable."""
    text_cfg = config.get("text_cfg", {})
    length = int(context_length or text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        info: dict[str, Any] = {"kind": "hf", "hf_tokenizer_name": text_cfg["hf_tokenizer_name"],
                                "context_length": length}
        if text_cfg.get("tokenizer_mode"):
            info["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    else:
        info = {"kind": "open_clip", "context_length": length}
    if kwargs:
        info["tokenizer_kwargs"] = kwargs
    return info


def make_tokenizer(info: Mapping[str, Any], cache_dir: str | Path | None = None) -> Callable[..., torch.Tensor]:
    """Build the tokenizer ``info`` describes; a hub tokenizer that cannot be fetched is one clear error."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    kwargs = dict(info.get("tokenizer_kwargs") or {})
    if info.get("kind") != "hf":
        return SimpleTokenizer(context_length=int(info["context_length"]), **kwargs)
    name = str(info["hf_tokenizer_name"])
    try:
        return HFTokenizer(name, context_length=int(info["context_length"]),
                           cache_dir=str(cache_dir) if cache_dir else None,
                           tokenizer_mode=info.get("tokenizer_mode"), **kwargs)
    except (OSError, ValueError, ImportError) as exc:  # transformers reports an offline hub as OSError
        if Path(name).is_dir():
            raise TokenizerUnavailable(f"cannot load the tokenizer from {name}: {_first_line(exc)}") from None
        raise TokenizerUnavailable(
            f"the tokenizer {name!r} must be downloaded from the Hugging Face hub, which cannot be reached from "
            f"here (and it is not in the cache); stage it in a local directory and set text_cfg.hf_tokenizer_name "
            f"to that path: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
