"""The CRD is generated from the spec model; the checked-in file must match it."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml
from kubetune.api import crd
from kubetune.api.spec import FinetuneRunSpec

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "crds" / "finetunerun.yaml"


def _walk(node: dict[str, Any], path: str = ""):  # type: ignore[no-untyped-def]
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schema() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_the_model() -> None:
    assert CHECKED_IN.read_text() == crd.render(), (
        "crds/finetunerun.yaml drifted from kubetune/api/spec.py: "
        "run `python -m kubetune.api.crd > crds/finetunerun.yaml`")


def test_crd_identity() -> None:
    doc = crd.crd()
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["metadata"]["name"] == "finetuneruns.kubetune.io"
    spec = doc["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ftr"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:5] == ["Phase", "Model", "Progress", "Loss", "Age"]
    assert columns["Artifact"]["priority"] == 1
    assert all(c["jsonPath"].startswith(".") for c in columns.values())


def test_every_field_has_a_description() -> None:
    missing = [path for path, node in _walk(_schema())
               if path and path != ".metadata" and not path.endswith(("[]", "{}")) and not node.get("description")]
    assert missing == []


def test_schema_is_structural() -> None:
    """No constructs a structural schema forbids; every node has a type; no $ref/anyOf left."""
    text = yaml.safe_dump(crd.crd())
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title:", "$defs"):
        assert forbidden not in text, forbidden
    for path, node in _walk(_schema()):
        assert "type" in node, path
        if node["type"] == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_bounds_enums_defaults_and_nullables() -> None:
    spec = _schema()["properties"]["spec"]
    training = spec["properties"]["training"]
    assert training["default"] == {}
    epochs = training["properties"]["epochs"]
    assert (epochs["minimum"], epochs["maximum"], epochs["default"]) == (1, 1000, 5)
    assert training["properties"]["precision"]["enum"] == ["auto", "fp32", "amp", "amp_bf16", "bf16"]
    lr = training["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert training["properties"]["gradClipNorm"]["nullable"] is True
    assert "default" not in training["properties"]["gradClipNorm"]
    assert spec["required"] == ["data"]
    assert spec["properties"]["data"]["required"] == ["train"]
    resources = spec["properties"]["resources"]["properties"]
    assert resources["tolerations"]["maxItems"] == 32
    assert resources["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert "pattern" in resources["cpu"]
    config = spec["properties"]["model"]["properties"]["config"]
    assert config["x-kubernetes-preserve-unknown-fields"] is True and "properties" not in config
    status = _schema()["properties"]["status"]
    assert not any("default" in node for _, node in _walk(status))
    assert status["properties"]["logTail"]["maxItems"] == 30


def test_object_defaults_expand_to_the_model_defaults() -> None:
    """`{}` plus nested defaults (what the API server does) equals the pydantic defaults."""
    spec_schema = _schema()["properties"]["spec"]

    def apply(schema: dict[str, Any], value: Any) -> Any:
        if not isinstance(value, dict) or schema.get("type") != "object":
            return value
        out = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in out and "default" in prop:
                out[name] = prop["default"]
            if name in out:
                out[name] = apply(prop, out[name])
        return out

    defaulted = apply(spec_schema, {"data": {"train": "s3://bucket/train.csv"}})
    model = FinetuneRunSpec.model_validate({"data": {"train": "s3://bucket/train.csv"}})
    assert FinetuneRunSpec.model_validate(defaulted) == model
    assert defaulted == model.dump()


def test_structural_conversion_unit() -> None:
    defs = {"E": {"enum": ["a", "b"], "title": "E", "type": "string"}}
    node = {"anyOf": [{"$ref": "#/$defs/E"}, {"type": "null"}], "default": None, "description": "d", "title": "T"}
    assert crd.structural(node, defs) == {"type": "string", "description": "d", "nullable": True, "enum": ["a", "b"]}
    node = {"anyOf": [{"exclusiveMinimum": 0.0, "type": "number"}, {"type": "null"}], "description": "x"}
    assert crd.structural(node, {}) == {"type": "number", "description": "x", "nullable": True, "minimum": 0.0,
                                        "exclusiveMinimum": True}
    with pytest.raises(ValueError):
        crd.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
