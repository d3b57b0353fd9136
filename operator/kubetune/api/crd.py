"""Generate the FinetuneRun CustomResourceDefinition from the pydantic models in :mod:`kubetune.api.spec`.

The spec model is the single source of truth: ``python -m kubetune.api.crd > crds/finetunerun.yaml`` writes the
checked-in CRD, and a unit test fails when that file drifts from the model.

Pydantic emits JSON Schema 2020-12; a Kubernetes CRD wants a *structural* OpenAPI v3.0 schema. The
conversion (:func:`structural`) is pure:

- ``$ref`` is inlined (siblings such as ``description``/``default`` win over the referenced definition);
- ``Optional[X]`` (``anyOf: [X, {type: null}]``) becomes ``X`` with ``nullable: true``; ``default: null`` is
  dropped;
- ``exclusiveMinimum: n`` (2020-12) becomes ``minimum: n, exclusiveMinimum: true`` (OpenAPI 3.0);
- ``additionalProperties: false`` and ``title`` are dropped (the API server prunes unknown fields);
- free-form maps keep ``x-kubernetes-preserve-unknown-fields: true`` and carry no properties;
- an object default equal to "all nested defaults" is written as ``{}`` (the API server then applies the
  nested defaults itself), other defaults have their ``null`` members removed.

Status is written only by the operator; its schema has no defaults.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from kubetune.api import spec as spec_module
from kubetune.api.spec import FinetuneRunSpec, FinetuneRunStatus

CRD_NAME = f"{spec_module.PLURAL}.{spec_module.GROUP}"

_DROP_KEYS = frozenset({"title", "$defs", "examples"})

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Running, Succeeded, Failed, Suspended or Cancelled."},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "description": "open_clip model name."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary",
     "description": "Epoch and percent done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss",
     "description": "Latest training loss."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1,
     "description": "Trainer Jobs created so far."},
    {"name": "Artifact", "type": "string", "jsonPath": ".status.artifact.uri", "priority": 1,
     "description": "The published artifact."},
]


def _resolve_ref(ref: str, defs: dict[str, Any]) -> dict[str, Any]:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise ValueError(f"unsupported $ref {ref!r}")
    return defs[ref[len(prefix):]]


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _nested_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """What the API server would fill into ``{}`` for an object schema (recursively)."""
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        if "default" in prop:
            default = prop["default"]
            if default == {} and prop.get("type") == "object" and "properties" in prop:
                default = _nested_defaults(prop)
            out[name] = default
    return out


def structural(node: dict[str, Any], defs: dict[str, Any], *, with_defaults: bool = True) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3.0 schema node. Pure."""
    node = copy.deepcopy(node)
    # Inline $ref; sibling keys (description, default) override the referenced schema's.
    if "$ref" in node:
        target = copy.deepcopy(_resolve_ref(node.pop("$ref"), defs))
        target.update(node)
        node = target
    if "anyOf" in node:
        any_of = node.pop("anyOf")
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in schema: {options!r}")
        merged = copy.deepcopy(options[0])
        merged.update(node)  # the outer node's own keys (description, default) win
        out = structural(merged, defs, with_defaults=with_defaults)
        if len(options) < len(any_of):
            out["nullable"] = True
        return _ordered(out)
    return _finish(node, defs, with_defaults=with_defaults)


def _finish(node: dict[str, Any], defs: dict[str, Any], *, with_defaults: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "additionalProperties":
            if value is False or preserve:
                continue
            if isinstance(value, dict):
                out[key] = structural(value, defs, with_defaults=with_defaults)
            continue
        if key == "properties":
            out[key] = {name: structural(prop, defs, with_defaults=with_defaults) for name, prop in value.items()}
            continue
        if key == "items":
            out[key] = structural(value, defs, with_defaults=with_defaults)
            continue
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
            continue
        if key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "default":
            continue  # handled below, once properties are converted
        out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if preserve:
        out["type"] = "object"
        out.pop("properties", None)
    if with_defaults and node.get("default") is not None:
        default = _strip_nulls(node["default"])
        if (isinstance(default, dict) and out.get("type") == "object" and "properties" in out
                and default == _nested_defaults(out)):
            default = {}
        out["default"] = default
    return _ordered(out)


_KEY_ORDER = ("type", "description", "nullable", "enum", "format", "pattern", "minLength", "maxLength",
              "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minItems", "maxItems",
              "maxProperties", "default", "x-kubernetes-preserve-unknown-fields", "required", "properties",
              "items", "additionalProperties")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order (type and description first) for the checked-in YAML."""
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def spec_schema() -> dict[str, Any]:
    raw = FinetuneRunSpec.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def status_schema() -> dict[str, Any]:
    raw = FinetuneRunStatus.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}), with_defaults=False)


def crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition (apiextensions.k8s.io/v1) as a dict."""
    spec_s = _ordered({**spec_schema(),
                       "description": "What to fine-tune, on which data, and how the run is executed."})
    status_s = _ordered({**status_schema(), "description": "Observed state, written by the kubetune operator."})
    root = {
        "type": "object",
        "description": ("A fine-tuning run of an open_clip CLIP model for text-to-image search. The kubetune "
                        "operator runs it as a Job and mirrors progress, metrics and the artifact into status."),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (kubetune.io/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of this object (FinetuneRun)."},
            "metadata": {"type": "object"},  # the API server forbids anything else here
            "spec": spec_s,
            "status": status_s,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": spec_module.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec_module.KIND,
                "listKind": f"{spec_module.KIND}List",
                "plural": spec_module.PLURAL,
                "singular": spec_module.SINGULAR,
                "shortNames": list(spec_module.SHORT_NAMES),
                "categories": ["kubetune"],
            },
            "versions": [{
                "name": spec_module.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


HEADER = "# Generated by `python -m kubetune.api.crd` from kubetune/api/spec.py. Do not edit by hand.\n"


def render() -> str:
    """The CRD as the YAML text checked in at crds/finetunerun.yaml."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
