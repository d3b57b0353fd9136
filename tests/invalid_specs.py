"""Hypothesis strategies for invalid FinetuneRun specs, each with the field path that must be blamed (no tests).

The catalogue of fields, types and bounds is read from the generated CRD (``crds/finetunerun.yaml``), so a new
field in ``kubetune/api/spec.py`` is covered without editing this file. Each generated case is a *valid* base spec
with exactly one thing broken:

- ``schema`` cases break one field against its OpenAPI schema (a bound, a length, a pattern, an enum, the type,
  ``maxItems``, or a required field missing); the API server must reject them naming ``path``, and so must the
  pydantic model (SDK, operator, trainer);
- ``cross`` cases are individually valid fields that break a rule a schema cannot express
  (:func:`kubetune.api.spec.cross_field_errors`); the API server accepts them and the operator must fail the run
  naming ``path``.

Unknown fields are not generated: the API server prunes them from a structural schema (Kubernetes 1.20 has no
field validation), so they are not an API-server rejection.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "finetunerun.yaml"

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "ViT-B-32"},
    "data": {"train": "s3://data/train.csv"},
    "training": {"epochs": 2, "batchSize": 8},
    "callbacks": {"evaluation": {"limit": 5}},
    "output": {"bucket": "kubetune"},
    "resources": {"gpus": 0, "cpu": "50m", "memory": "64Mi"},
    "runPolicy": {"backoffLimit": 1},
}

# Parents that must exist (as {}) before a leaf under them can be set; arrays get one element.
_SKIP = {"spec.model.config"}  # x-kubernetes-preserve-unknown-fields: anything goes


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "schema" | "cross"
    path: str  # the field path that must be blamed, API-server style: spec.resources.tolerations[0].operator
    what: str  # what was broken (for messages)
    spec: dict[str, Any]

    def key(self) -> str:
        return json.dumps(self.spec, sort_keys=True)


@cache
def spec_schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD_FILE.read_text())
    schema: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def leaves() -> list[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every schema node below spec (objects too: they can get a wrong type), as (key path, node)."""
    out: list[tuple[tuple[str | int, ...], dict[str, Any]]] = []

    def walk(node: dict[str, Any], path: tuple[str | int, ...]) -> None:
        if path:
            out.append((path, node))
        if dotted(path) in _SKIP:
            return
        for name, prop in (node.get("properties") or {}).items():
            walk(prop, (*path, name))
        if isinstance(node.get("items"), dict):
            walk(node["items"], (*path, 0))

    walk(spec_schema(), ())
    return out


def dotted(path: tuple[str | int, ...]) -> str:
    text = "spec"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def put(spec: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of ``spec`` with ``value`` at ``path`` (missing objects created, arrays get element 0)."""
    out = copy.deepcopy(spec)
    node: Any = out
    for part, nxt in itertools.pairwise(path):
        if isinstance(part, int):
            while len(node) <= part:
                node.append({} if not isinstance(nxt, int) else [])
            node = node[part]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value
    return out


def _not_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


_words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
_non_numeric = _words.filter(lambda s: _not_number(s) and s.strip().lower() not in {
    "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0"})


def _wrong_types(node: dict[str, Any]) -> list[st.SearchStrategy[Any]]:
    """Values of another JSON type than ``node['type']`` that no lax conversion turns into the right one."""
    kind = node.get("type")
    ints = st.integers(min_value=-10**6, max_value=10**6)
    options: dict[str, st.SearchStrategy[Any]] = {
        "string": _non_numeric,
        "integer": ints,
        "number": st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: x != int(x)),
        "boolean": st.booleans(),
        "object": st.just({"x": 1}) if kind != "object" else st.nothing(),
        "array": st.lists(st.integers(0, 9), min_size=1, max_size=3),
    }
    if kind == "integer":  # fractions, non-numeric text, lists, objects; not booleans (see note below)
        return [options["number"], _non_numeric, options["array"], st.just({"x": 1})]
    if kind == "number":
        return [_non_numeric, options["array"], st.just({"x": 1})]
    if kind == "string":
        return [ints, options["array"], st.just({"x": 1}), st.booleans()]
    if kind == "boolean":
        return [_non_numeric, st.integers(min_value=2, max_value=10**6), options["array"], st.just({"x": 1})]
    if kind == "object":
        return [_non_numeric, ints, options["array"]]
    if kind == "array":
        return [_non_numeric, ints, st.just({"x": 1})]
    return []


def _violations(node: dict[str, Any]) -> list[tuple[str, st.SearchStrategy[Any]]]:
    """(what, strategy) pairs of values of the right type that break one of ``node``'s constraints."""
    out: list[tuple[str, st.SearchStrategy[Any]]] = []
    kind = node.get("type")
    if kind in ("integer", "number"):
        ints = kind == "integer"
        lo, hi = node.get("minimum"), node.get("maximum")
        if lo is not None:
            excl = bool(node.get("exclusiveMinimum"))
            top = lo if excl else (lo - 1 if ints else lo - 1e-9)
            out.append(("below minimum", st.integers(-10**9, math.floor(top)) if ints
                        else st.floats(-1e9, top, allow_nan=False)))
        if hi is not None:
            excl = bool(node.get("exclusiveMaximum"))
            bottom = hi if excl else (hi + 1 if ints else hi + 1e-6)
            out.append(("above maximum", st.integers(math.ceil(bottom), 10**12) if ints
                        else st.floats(bottom, 1e12, allow_nan=False)))
    elif kind == "string":
        if node.get("enum"):
            allowed = set(node["enum"])
            out.append(("not in enum", _words.filter(lambda s: s not in allowed)))
        if node.get("maxLength") is not None:
            n = int(node["maxLength"])
            out.append(("too long", st.integers(n + 1, n + 300).map(lambda k: "a" * k)))
        if node.get("minLength"):
            out.append(("too short", st.just("")))
        if node.get("pattern"):
            pattern = re.compile(node["pattern"])
            limit = node.get("maxLength")
            out.append(("pattern mismatch", _words.filter(
                lambda s: not pattern.search(s) and (limit is None or len(s) <= limit))))
    elif kind == "array" and node.get("maxItems") is not None:
        n = int(node["maxItems"])
        item = node.get("items") or {}
        element: Any = {} if item.get("type") == "object" else "x"
        out.append(("too many items", st.integers(n + 1, n + 5).map(lambda k: [element] * k)))
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        out.append(("map value of the wrong type", st.integers().map(lambda v: {"k": v})))
    return out


#: The required fields left out: two fixed cases among hundreds of generated ones, so tests also check them directly.
REQUIRED_MISSING = (
    Case("schema", "spec.data", "required field missing", {k: v for k, v in BASE_SPEC.items() if k != "data"}),
    Case("schema", "spec.data.train", "required field missing", {**BASE_SPEC, "data": {"eval": "s3://d/e.csv"}}),
)


def schema_cases() -> st.SearchStrategy[Case]:
    """One field broken against the schema: bound, length, pattern, enum, type, maxItems; or data.train missing."""
    def case(kind: str, blame: str, what: str, path: tuple[str | int, ...]) -> Callable[[Any], Case]:
        return lambda value: Case(kind, blame, what, put(BASE_SPEC, path, value))

    choices: list[st.SearchStrategy[Case]] = []
    for path, node in leaves():
        where = dotted(path)
        for what, values in _violations(node):
            blame = where + (".k" if what == "map value of the wrong type" else "")
            choices.append(values.map(case("schema", blame, what, path)))
        for values in _wrong_types(node):
            choices.append(values.map(case("schema", where, "wrong type", path)))
    choices.extend(st.just(case) for case in REQUIRED_MISSING)
    return st.one_of(choices)


_uri = st.from_regex(r"\As3://data/[a-z]{1,12}\.csv\Z")


def cross_cases() -> st.SearchStrategy[Case]:
    """Valid fields, invalid combination (the rules in kubetune.api.spec.cross_field_errors)."""
    def with_(**parts: Any) -> dict[str, Any]:
        spec = copy.deepcopy(BASE_SPEC)
        for key, value in parts.items():
            spec[key] = {**spec.get(key, {}), **value}
        return spec

    split = st.floats(min_value=0.01, max_value=0.5, allow_nan=False)
    return st.one_of(
        st.tuples(_uri, split).map(lambda a: Case("cross", "spec.data.valSplit", "eval and valSplit",
                                                  with_(data={"train": "s3://d/t.csv", "eval": a[0],
                                                              "valSplit": a[1]}))),
        st.tuples(st.from_regex(r"\A[a-z0-9_]{1,20}\Z"), _uri).map(
            lambda a: Case("cross", "spec.model.weights", "pretrained and weights",
                           with_(model={"pretrained": a[0], "weights": a[1]}))),
        st.from_regex(r"\Akt-[a-z0-9]{1,12}\Z").map(  # not an open_clip model with weights: nothing to start from
            lambda n: Case("cross", "spec.model.name", "a name with no default tag", with_(model={"name": n}))),
        st.just(Case("cross", "spec.training.lockText", "both towers locked",
                     with_(training={"lockImage": True, "lockText": True}))),
        _uri.map(lambda u: Case("cross", "spec.data.query", "index without query",
                                with_(data={"train": "s3://d/t.csv", "index": u}))),
        st.sampled_from(["min", "max"]).map(lambda m: Case(
            "cross", "spec.callbacks.bestModel.monitor", "val_loss without validation",
            with_(callbacks={"bestModel": {"monitor": "val_loss", "mode": m}}))),
        st.integers(1, 50).map(lambda p: Case(
            "cross", "spec.callbacks.earlyStopping.monitor", "val_loss without validation",
            with_(callbacks={"earlyStopping": {"monitor": "val_loss", "patience": p}}))),
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=21).map(lambda sweep: Case(
            "cross", "spec.callbacks.wiseFt.sweep", "a WiSE-FT sweep without evaluation data",
            with_(callbacks={"wiseFt": {"sweep": sweep}}))),
        _uri.map(lambda u: Case("cross", "spec.data.reference", "a reference set without a sweep",
                                with_(data={"train": "s3://d/t.csv", "reference": u}))),
        st.from_regex(r"\A[a-z]{1,8}:[a-z0-9]{1,8}\Z").map(lambda cred: Case(
            "cross", "spec.output.endpoint", "credentials in the endpoint",
            with_(output={"endpoint": f"http://{cred}@minio:9000"}))),
    )


def invalid_specs() -> st.SearchStrategy[Case]:
    return st.one_of(schema_cases(), cross_cases())


def schema_errors(spec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(path, reason) of each violation of the CRD's OpenAPI v3.0 schema (jsonschema, Draft 4 semantics:
    boolean exclusiveMinimum, as OpenAPI 3.0 has it)."""
    from jsonschema import Draft4Validator

    for error in Draft4Validator(spec_schema()).iter_errors(spec):
        yield dotted(tuple(error.absolute_path)), error.message
