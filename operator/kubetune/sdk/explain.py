"""``kubetune explain FIELD``: a FinetuneRun field's type, default, bounds and description, offline.

The text comes from the same OpenAPI schema the CRD carries (:mod:`kubetune.api.crd`, generated from the spec
model), so it is what ``kubectl explain finetunerun.<field>`` shows on a cluster. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import json
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kubetune.api.errors import ConfigInvalid

ROOT_DESCRIPTION = ("FinetuneRun (kubetune.io/v1alpha1, short name ftr): fine-tune an open_clip CLIP model for "
                    "text-to-image search. `spec` says what to train on what, `status` is written by the operator.")
_RESOURCE_PREFIXES = ("finetuneruns.kubetune.io.", "finetunerun.kubetune.io.", "finetuneruns.", "finetunerun.",
                      "ftr.")


@dataclass(frozen=True)
class Field:
    path: str  # canonical camelCase path, e.g. spec.training.learningRate
    schema: dict[str, Any]
    required: bool


@lru_cache(maxsize=1)
def _root() -> dict[str, Any]:
    from kubetune.api.crd import spec_schema, status_schema

    return {"type": "object", "description": ROOT_DESCRIPTION, "required": ["spec"],
            "properties": {"spec": {**spec_schema(), "description": "What to fine-tune, on what, and how."},
                           "status": {**status_schema(), "description": "Written by the operator."}}}


def _key(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _children(node: dict[str, Any]) -> dict[str, Any]:
    """The fields below a node; an array's are those of its items (as kubectl explain walks them)."""
    while node.get("type") == "array":
        node = node.get("items") or {}
    return dict(node.get("properties") or {})


def _all_paths(node: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for name, child in _children(node).items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        out += _all_paths(child, path)
    return out


def _parts(path: str) -> list[str]:
    text = path.strip()
    for prefix in _RESOURCE_PREFIXES:
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
            break
    if text.lower() in ("finetunerun", "finetuneruns", "ftr", ""):
        return []
    parts = [p.split("[", 1)[0] for p in text.split(".")]
    if any(not p for p in parts):
        raise ConfigInvalid(f"{path!r} is not a field path", "write it with dots, e.g. spec.training.learningRate")
    if _key(parts[0]) not in ("spec", "status"):
        parts.insert(0, "spec")  # `kubetune explain training.epochs` means the spec's
    return parts


def lookup(path: str) -> Field:
    """The field at ``path`` (camelCase or snake_case, with or without ``spec.`` or ``finetunerun.``);
    :class:`ConfigInvalid` naming the nearest fields when there is none."""
    node = _root()
    canonical: list[str] = []
    required = True
    for part in _parts(path):
        children = _children(node)
        match = next((name for name in children if _key(name) == _key(part)), None)
        if match is None:
            raise ConfigInvalid(f"unknown field {'.'.join([*canonical, part])}", _suggest(canonical, part, children))
        parent = node
        while parent.get("type") == "array":
            parent = parent.get("items") or {}
        required = match in (parent.get("required") or [])
        node = children[match]
        canonical.append(match)
    return Field(".".join(canonical) or "finetunerun", node, required)


def _suggest(canonical: list[str], part: str, children: dict[str, Any]) -> str:
    here = ".".join(canonical)
    near = difflib.get_close_matches(part, list(children), n=3, cutoff=0.6) or [
        name for name in children if _key(part) in _key(name)][:3]
    if near:
        return "did you mean " + " or ".join(f"{here}.{n}" for n in near) + "?"
    everywhere = _all_paths(_root(), "")
    by_leaf = {p: p.rsplit(".", 1)[-1] for p in everywhere}
    leaves = difflib.get_close_matches(part, sorted(set(by_leaf.values())), n=3, cutoff=0.75)
    elsewhere = [p for p, leaf in by_leaf.items() if leaf in leaves][:3]
    if elsewhere:
        return "did you mean " + " or ".join(elsewhere) + "?"
    if children:
        return f"the fields of {here or 'finetunerun'}: " + ", ".join(children)
    return f"{here} has no fields below it"


def type_name(node: dict[str, Any]) -> str:
    kind = str(node.get("type") or ("object" if node.get("x-kubernetes-preserve-unknown-fields") else "any"))
    if kind == "array":
        return f"[]{type_name(node.get('items') or {})}"
    if kind == "object" and not node.get("properties") and node.get("additionalProperties"):
        return f"map[string]{type_name(node['additionalProperties'])}"
    return kind


def bounds(node: dict[str, Any]) -> list[str]:
    out = []
    if "minimum" in node:
        out.append(f"{'>' if node.get('exclusiveMinimum') else '≥'} {node['minimum']}")
    if "maximum" in node:
        out.append(f"{'<' if node.get('exclusiveMaximum') else '≤'} {node['maximum']}")
    for low, high, what in (("minLength", "maxLength", "characters"), ("minItems", "maxItems", "items"),
                            ("minProperties", "maxProperties", "entries")):
        if low in node and high in node:
            out.append(f"{node[low]} to {node[high]} {what}")
        elif low in node:
            out.append(f"at least {node[low]} {what}")
        elif high in node:
            out.append(f"at most {node[high]} {what}")
    if "pattern" in node:
        out.append(f"matches {node['pattern']}")
    return out


def render(field: Field, recursive: bool = False) -> str:
    """kubectl-explain-like text."""
    node = field.schema
    lines = [f"FIELD:       {field.path}", f"TYPE:        {type_name(node)}"
             + ("   (required)" if field.required and field.path != "finetunerun" else "")]
    if "default" in node:
        lines.append(f"DEFAULT:     {json.dumps(node['default'], ensure_ascii=False)}")
    if node.get("enum"):
        lines.append("VALUES:      " + ", ".join(str(v) for v in node["enum"]))
    limits = bounds(node)
    if limits:
        lines.append("BOUNDS:      " + "; ".join(limits))
    if node.get("nullable"):
        lines.append("OPTIONAL:    may be left out")
    lines += ["", "DESCRIPTION:", textwrap.fill(node.get("description") or "(none)", width=100, initial_indent="    ",
                                                 subsequent_indent="    ")]
    children = _children(node)
    if children:
        lines += ["", "FIELDS:"]
        lines += _field_lines(node, 1, recursive)
    return "\n".join(lines)


def _field_lines(node: dict[str, Any], depth: int, recursive: bool) -> list[str]:
    inner = node
    while inner.get("type") == "array":
        inner = inner.get("items") or {}
    required = set(inner.get("required") or [])
    out = []
    for name, child in _children(node).items():
        summary = textwrap.shorten(child.get("description") or "", width=70, placeholder=" …")
        label = f"{name} <{type_name(child)}>" + (" (required)" if name in required else "")
        out.append("    " * depth + (f"{label:<34} {summary}" if not recursive else label))
        if recursive:
            out += _field_lines(child, depth + 1, recursive)
    return out
