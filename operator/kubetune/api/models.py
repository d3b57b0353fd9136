"""Which weights a model name starts from: open_clip's pretrained tag per model, as a pure table.

``spec.model`` names an open_clip model; without ``pretrained`` it starts from that model's **default tag**
(:data:`DEFAULT_TAGS`), so that ``name: ViT-B-32`` fine-tunes a trained CLIP, never a random one by accident.
A random init is asked for explicitly with ``pretrained: random``. :func:`resolve_pretrained` is the one place
these rules live; the trainer applies it and records the tag in the artifact's ``metadata.json``, the spec's
cross-field check uses it to refuse, before any pod starts, a name that has no default, and
``kubetune.describe_models()`` marks the defaults.

The default tag of a model is the tag open_clip lists first for it (its original release: OpenAI's weights for
OpenAI's architectures, LAION's for LAION's), except for ViT-B-32, ViT-B-16 and ViT-L-14: open_clip lists OpenAI's
weights first there, but they were trained with QuickGELU and these configs use GELU (open_clip loads them with a
warning and a worse model), so their default is the LAION-2B tag, trained with GELU. ``tests/unit/test_models.py``
holds this table to the installed open_clip's ``list_pretrained()``, so it cannot drift from what the trainer can
load. No torch or open_clip here: the operator and the SDK import this module.

Air-gapped clusters read weights from a **model mirror** (:func:`mirror_key`): ``<mirror>/<NAME>/<TAG>/`` holds
the weights file and a ``manifest.json`` with its sha256, written by ``kubetune models stage NAME::TAG``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

RANDOM_INIT = "random"
"""``spec.model.pretrained`` for a random init. A word, not YAML's null: an absent or null ``pretrained`` means
the default tag, and ``none`` would read as null to most YAML readers while being the string ``"none"``."""

HUB_SCHEMAS = ("hf-hub:", "local-dir:")
"""open_clip model names that carry their own weights (a Hugging Face repo, a local directory): no tag."""

DEFAULT_NAME = "ViT-B-32"
"""``spec.model.name`` when unset."""

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
"""The state-dict files the trainer loads (``spec.model.weights``, a mirror entry's one file)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# The models open_clip has pretrained weights for, each with its default tag (see the module doc for the rule).
DEFAULT_TAGS: Mapping[str, str] = MappingProxyType({
    "RN50": "openai", "RN101": "openai", "RN50x4": "openai", "RN50x16": "openai", "RN50x64": "openai",
    "ViT-B-32": "laion2b_s34b_b79k", "ViT-B-32-256": "datacomp_s34b_b86k", "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-B-16-plus-240": "laion400m_e31", "ViT-L-14": "laion2b_s32b_b82k", "ViT-L-14-336": "openai",
    "ViT-H-14": "laion2b_s32b_b79k", "ViT-H-14-378": "dfn5b", "ViT-g-14": "laion2b_s12b_b42k",
    "ViT-bigG-14": "laion2b_s39b_b160k", "roberta-ViT-B-32": "laion2b_s12b_b32k",
    "xlm-roberta-base-ViT-B-32": "laion5b_s13b_b90k", "xlm-roberta-large-ViT-H-14": "frozen_laion5b_s13b_b90k",
    "convnext_base": "laion400m_s13b_b51k", "convnext_base_w": "laion2b_s13b_b82k",
    "convnext_base_w_320": "laion_aesthetic_s13b_b82k", "convnext_large_d": "laion2b_s26b_b102k_augreg",
    "convnext_large_d_320": "laion2b_s29b_b131k_ft", "convnext_xxlarge": "laion2b_s34b_b82k_augreg",
    "coca_ViT-B-32": "laion2b_s13b_b90k", "coca_ViT-L-14": "laion2b_s13b_b90k", "EVA01-g-14": "laion400m_s11b_b41k",
    "EVA01-g-14-plus": "merged2b_s11b_b114k", "EVA02-B-16": "merged2b_s8b_b131k", "EVA02-L-14": "merged2b_s4b_b131k",
    "EVA02-L-14-336": "merged2b_s6b_b61k", "EVA02-E-14": "laion2b_s4b_b115k", "EVA02-E-14-plus": "laion2b_s9b_b144k",
    "ViT-B-16-SigLIP": "webli", "ViT-B-16-SigLIP-256": "webli", "ViT-B-16-SigLIP-i18n-256": "webli",
    "ViT-B-16-SigLIP-384": "webli", "ViT-B-16-SigLIP-512": "webli", "ViT-L-16-SigLIP-256": "webli",
    "ViT-L-16-SigLIP-384": "webli", "ViT-SO400M-14-SigLIP": "webli", "ViT-SO400M-16-SigLIP-i18n-256": "webli",
    "ViT-SO400M-14-SigLIP-378": "webli", "ViT-SO400M-14-SigLIP-384": "webli", "ViT-B-32-SigLIP2-256": "webli",
    "ViT-B-16-SigLIP2": "webli", "ViT-B-16-SigLIP2-256": "webli", "ViT-B-16-SigLIP2-384": "webli",
    "ViT-B-16-SigLIP2-512": "webli", "ViT-L-16-SigLIP2-256": "webli", "ViT-L-16-SigLIP2-384": "webli",
    "ViT-L-16-SigLIP2-512": "webli", "ViT-SO400M-14-SigLIP2": "webli", "ViT-SO400M-14-SigLIP2-378": "webli",
    "ViT-SO400M-16-SigLIP2-256": "webli", "ViT-SO400M-16-SigLIP2-384": "webli", "ViT-SO400M-16-SigLIP2-512": "webli",
    "ViT-gopt-16-SigLIP2-256": "webli", "ViT-gopt-16-SigLIP2-384": "webli", "ViT-L-14-CLIPA": "datacomp1b",
    "ViT-L-14-CLIPA-336": "datacomp1b", "ViT-H-14-CLIPA": "datacomp1b", "ViT-H-14-CLIPA-336": "laion2b",
    "ViT-bigG-14-CLIPA": "datacomp1b", "ViT-bigG-14-CLIPA-336": "datacomp1b", "nllb-clip-base": "v1",
    "nllb-clip-large": "v1", "nllb-clip-base-siglip": "v1", "nllb-clip-large-siglip": "v1",
    "MobileCLIP-S1": "datacompdr", "MobileCLIP-S2": "datacompdr", "MobileCLIP-B": "datacompdr",
    "MobileCLIP2-B": "dfndr2b", "MobileCLIP2-S0": "dfndr2b", "MobileCLIP2-S2": "dfndr2b",
    "MobileCLIP2-S3": "dfndr2b", "MobileCLIP2-S4": "dfndr2b", "MobileCLIP2-L-14": "dfndr2b",
    "ViTamin-S": "datacomp1b", "ViTamin-S-LTT": "datacomp1b", "ViTamin-B": "datacomp1b",
    "ViTamin-B-LTT": "datacomp1b", "ViTamin-L": "datacomp1b", "ViTamin-L-256": "datacomp1b",
    "ViTamin-L-336": "datacomp1b", "ViTamin-L-384": "datacomp1b", "ViTamin-L2": "datacomp1b",
    "ViTamin-L2-256": "datacomp1b", "ViTamin-L2-336": "datacomp1b", "ViTamin-L2-384": "datacomp1b",
    "ViTamin-XL-256": "datacomp1b", "ViTamin-XL-336": "datacomp1b", "ViTamin-XL-384": "datacomp1b",
    "PE-Core-T-16-384": "meta", "PE-Core-S-16-384": "meta", "PE-Core-B-16": "meta", "PE-Core-L-14-336": "meta",
    "PE-Core-bigG-14-448": "meta", "ViT-H-14-worldwide": "metaclip2_worldwide",
    "ViT-H-14-worldwide-378": "metaclip2_worldwide", "ViT-bigG-14-worldwide": "metaclip2_worldwide",
    "ViT-bigG-14-worldwide-378": "metaclip2_worldwide", "RN50-quickgelu": "openai", "RN101-quickgelu": "openai",
    "RN50x4-quickgelu": "openai", "RN50x16-quickgelu": "openai", "RN50x64-quickgelu": "openai",
    "ViT-B-32-quickgelu": "openai", "ViT-B-16-quickgelu": "openai", "ViT-L-14-quickgelu": "openai",
    "ViT-L-14-336-quickgelu": "openai", "ViT-H-14-quickgelu": "metaclip_fullcc", "ViT-H-14-378-quickgelu": "dfn5b",
    "ViT-bigG-14-quickgelu": "metaclip_fullcc", "ViT-H-14-worldwide-quickgelu": "metaclip2_worldwide",

})
# Where the default is not the first-listed tag, and why (the unit test checks both).
NOT_FIRST_LISTED: Mapping[str, str] = MappingProxyType({
    "ViT-B-32": "the first-listed openai weights are QuickGELU-trained; this config uses GELU",
    "ViT-B-16": "the first-listed openai weights are QuickGELU-trained; this config uses GELU",
    "ViT-L-14": "the first-listed openai weights are QuickGELU-trained; this config uses GELU",
})


def default_tag(name: str) -> str | None:
    """The tag ``name`` alone starts from; None when open_clip has no pretrained weights for it."""
    return DEFAULT_TAGS.get(name)


def resolve_pretrained(name: str, pretrained: str | None, weights: str | None,
                       config: Mapping[str, Any] | None) -> str | None:
    """The pretrained tag a ``spec.model`` starts from, or None when no tag is loaded.

    - ``pretrained: random``: None, a random init;
    - ``pretrained: TAG``: that tag;
    - ``weights`` set: None, the weights fill the model;
    - a custom ``config``: None, a random init: a custom config has no tag to default to;
    - a name with a schema (``hf-hub:``, ``local-dir:``): None, the repo or directory holds the weights;
    - otherwise the name's default tag. Raises ``ValueError`` (the reason) for a name that has none.
    """
    if pretrained:
        return None if pretrained == RANDOM_INIT else pretrained
    if weights or config is not None or name.startswith(HUB_SCHEMAS):
        return None
    tag = default_tag(name)
    if tag is None:
        raise ValueError(f"open_clip has no pretrained weights for {name!r}, so the name alone means nothing to "
                         f"start from: set model.pretrained to a tag, model.weights, or model.pretrained: "
                         f"{RANDOM_INIT} to train it from a random init")
    return tag


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME::TAG`` (clip-as-service's and Finetuner's spelling) → ``(NAME, TAG)``; ``ValueError`` otherwise."""
    name, sep, tag = ref.partition("::")
    if not sep or not _NAME.match(name) or not _NAME.match(tag):
        raise ValueError(f"{ref!r} is not NAME::TAG (e.g. ViT-B-32::laion2b_s34b_b79k)")
    if tag == RANDOM_INIT:
        raise ValueError(f"{ref!r}: {RANDOM_INIT!r} means a random init, it has no weights")
    return name, tag


def mirror_key(name: str, tag: str) -> str | None:
    """Where NAME::TAG lives under a model mirror's root (``NAME/TAG``); None for a name or tag that cannot be
    a key (a path, a hub reference)."""
    if not _NAME.match(name) or not _NAME.match(tag):
        return None
    return f"{name}/{tag}"


__all__ = ["DEFAULT_NAME", "DEFAULT_TAGS", "HUB_SCHEMAS", "NOT_FIRST_LISTED", "RANDOM_INIT", "WEIGHT_SUFFIXES",
           "default_tag", "mirror_key", "parse_ref", "resolve_pretrained"]
