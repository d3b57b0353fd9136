"""What a model name starts from: the default-tag table against open_clip, the resolution rules, the spec's
refusal of a name with nothing to start from, ``describe_models``' default column, staging's argument errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kubetune.api.errors import ConfigInvalid
from kubetune.api.models import (
    DEFAULT_TAGS,
    NOT_FIRST_LISTED,
    RANDOM_INIT,
    mirror_key,
    parse_ref,
    resolve_pretrained,
)
from kubetune.api.spec import ModelSpec
from kubetune.api.validation import validate_spec

pytestmark = pytest.mark.unit

TINY = {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}


def test_default_tags_follow_open_clips_own_list() -> None:
    open_clip = pytest.importorskip("open_clip")
    listed: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        listed.setdefault(name, []).append(tag)
    missing, extra = sorted(set(listed) - set(DEFAULT_TAGS)), sorted(set(DEFAULT_TAGS) - set(listed))
    assert not missing and not extra, (
        f"kubetune.api.models.DEFAULT_TAGS drifted from open_clip {open_clip.__version__}: add {missing} (first "
        f"listed tags: {[(n, listed[n][0]) for n in missing]}), remove {extra}")
    for name, tags in listed.items():
        if name in NOT_FIRST_LISTED:
            # the exception's reason: the first-listed weights were trained with another activation than the
            # config's; the chosen tag matches it
            config = open_clip.get_model_config(name)
            assert open_clip.get_pretrained_cfg(name, tags[0]).get("quick_gelu", False) != config.get("quick_gelu",
                                                                                                      False)
            assert DEFAULT_TAGS[name] in tags[1:], name
            assert open_clip.get_pretrained_cfg(name, DEFAULT_TAGS[name]).get("quick_gelu", False) == config.get(
                "quick_gelu", False)
        else:
            assert DEFAULT_TAGS[name] == tags[0], name
        assert RANDOM_INIT not in tags
        assert mirror_key(name, DEFAULT_TAGS[name]) == f"{name}/{DEFAULT_TAGS[name]}"


@pytest.mark.parametrize(("model", "tag"), [
    ({}, "laion2b_s34b_b79k"),  # the default name, its default tag
    ({"name": "RN50"}, "openai"),
    ({"name": "ViT-B-32", "pretrained": "openai"}, "openai"),
    ({"name": "ViT-B-32", "pretrained": RANDOM_INIT}, None),
    ({"name": "ViT-B-32", "weights": "s3://b/w.safetensors"}, None),
    ({"name": "kt-tiny", "config": TINY}, None),  # a custom config has no tag to default to
    ({"name": "kt-tiny", "config": TINY, "pretrained": "kt-v1"}, "kt-v1"),
    ({"name": "hf-hub:timm/ViT-B-16-SigLIP"}, None),  # the repo holds the weights
])
def test_a_name_alone_starts_from_its_default_tag_and_random_init_is_explicit(model: dict, tag: str | None) -> None:
    assert ModelSpec.model_validate(model).pretrained_tag() == tag


def test_a_name_with_no_default_tag_is_refused_before_any_pod() -> None:
    spec, errors = validate_spec({"model": {"name": "ViT-M-16"}, "data": {"train": "s3://b/t.csv"}})
    assert spec is None and [path for path, _ in errors] == ["spec.model.name"]
    assert "ViT-M-16" in errors[0][1] and "pretrained: random" in errors[0][1]
    spec, errors = validate_spec({"model": {"name": "ViT-M-16", "pretrained": RANDOM_INIT},
                                  "data": {"train": "s3://b/t.csv"}})
    assert spec is not None and not errors
    with pytest.raises(ValueError, match="no pretrained weights for 'ViT-M-16'"):
        resolve_pretrained("ViT-M-16", None, None, None)


def test_refs_are_name_and_tag() -> None:
    assert parse_ref("ViT-B-32::laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    for bad in ("ViT-B-32", "ViT-B-32::", "::openai", "../x::y", "ViT-B-32::a/b", f"ViT-B-32::{RANDOM_INIT}"):
        with pytest.raises(ValueError):
            parse_ref(bad)
    assert mirror_key("ViT-B-32", "/etc/weights.pt") is None


def test_describe_models_marks_each_names_default_tag() -> None:
    from kubetune.sdk.models import describe_models

    rows = describe_models()
    defaults = {(r["name"], r["pretrained"]) for r in rows if r["default"]}
    assert ("ViT-B-32", "laion2b_s34b_b79k") in defaults and ("ViT-B-32", "openai") not in defaults
    assert all(r["default"] == (DEFAULT_TAGS.get(r["name"]) == r["pretrained"]) for r in rows)
    every = describe_models(all_pretrained=True)
    assert sum(r["default"] for r in every) == len(DEFAULT_TAGS)  # one per name


def test_the_table_and_staging_import_no_torch() -> None:
    code = ("import sys, kubetune.api.models, kubetune.api.spec, kubetune.sdk.staging; "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_staging_refuses_bad_arguments_before_any_upload(tmp_path: Path) -> None:
    from kubetune.sdk.staging import stage_model

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not uploaded")
    cases = [("ViT-B-32", "s3://models/mirror", weights, "not NAME::TAG"),
             ("kt-tiny::v1", "/local/dir", weights, "not a model mirror"),
             ("kt-tiny::v1", "s3://models/mirror", tmp_path / "absent.safetensors", "no such weights file"),
             ("kt-tiny::v1", "s3://models/mirror", tmp_path, "no such weights file")]
    (tmp_path / "w.txt").write_text("x")
    cases.append(("kt-tiny::v1", "s3://models/mirror", tmp_path / "w.txt", "not a weights file"))
    for ref, dest, source, needle in cases:
        with pytest.raises(ConfigInvalid, match=needle) as raised:
            # a closed port: reaching the store at all would be a StorageUnavailable, not these errors
            stage_model(ref, dest, source, endpoint="http://127.0.0.1:9")
        assert raised.value.hint
