"""Bad input, offline: ≥ 1,000 hypothesis-generated invalid FinetuneRun specs are each rejected by the CRD schema
(what the API server enforces) and by the pydantic model (what the SDK, operator and trainer enforce), naming the
field path and a reason; malformed trainer output folds into a small, valid status and never raises."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.events import MARKER, format_event
from kubetune.api.spec import FinetuneRunSpec, FinetuneRunStatus
from kubetune.api.validation import validate_spec
from kubetune.lifecycle.fold import StatusFolder, status_size

from tests.invalid_specs import BASE_SPEC, REQUIRED_MISSING, Case, invalid_specs, schema_errors

pytestmark = pytest.mark.unit

N_SPECS = 1200
N_FLOOD = 20_000


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def check_rejected(case: Case) -> None:
    model, errors = validate_spec(case.spec)
    assert model is None, f"the model accepted {case.what} at {case.path}: {case.spec}"
    paths = [p for p, _ in errors]
    assert case.path in paths, f"{case.what}: expected {case.path} in {errors}"
    assert all(reason.strip() for _, reason in errors), errors
    crd = list(schema_errors(case.spec))
    if case.kind == "cross":
        assert crd == [], f"a cross-field case must pass the schema: {crd}"
        return
    expected = _parent(case.path) if case.what == "required field missing" else case.path
    assert crd, f"the CRD schema accepted {case.what} at {case.path}: {case.spec}"
    assert expected in [p for p, _ in crd], f"{case.what}: expected {expected} in {crd}"


def test_base_spec_is_valid() -> None:
    assert validate_spec(BASE_SPEC) == (FinetuneRunSpec.model_validate(BASE_SPEC), [])
    assert list(schema_errors(BASE_SPEC)) == []


def test_invalid_specs_are_rejected_with_path_and_reason() -> None:
    seen: dict[str, Case] = {}

    @settings(max_examples=N_SPECS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(invalid_specs())
    def check(case: Case) -> None:
        seen[case.key()] = case
        check_rejected(case)

    started = time.monotonic()
    check()
    elapsed = time.monotonic() - started
    kinds = {c.what for c in seen.values()}
    paths = {c.path for c in seen.values()}
    print(f"{len(seen)} distinct invalid specs, {len(paths)} field paths, {len(kinds)} kinds in {elapsed:.1f}s")
    assert len(seen) >= 1000
    assert len(paths) >= 60 and {"wrong type", "below minimum", "above maximum", "too long", "pattern mismatch",
                                 "not in enum", "too many items"} <= kinds


@pytest.mark.parametrize("case", REQUIRED_MISSING, ids=lambda c: c.path)
def test_a_missing_required_field_is_rejected_naming_its_parent(case: Case) -> None:
    check_rejected(case)


@pytest.mark.parametrize(("spec", "path"), [
    ({**BASE_SPEC, "training": {"epochs": True}}, "spec.training.epochs"),
    ({**BASE_SPEC, "training": {"learningRate": False}}, "spec.training.learningRate"),
    ({**BASE_SPEC, "resources": {"tolerations": [{"operator": "Sometimes"}]}},
     "spec.resources.tolerations[0].operator"),
])
def test_booleans_are_not_numbers_and_list_paths_use_brackets(spec: dict[str, Any], path: str) -> None:
    # The API server rejects a boolean where a number is due; the model must agree (pydantic's lax mode would
    # read true as 1). List elements are named the API server's way: tolerations[0].
    _, errors = validate_spec(spec)
    assert path in [p for p, _ in errors], errors
    assert path in [p for p, _ in schema_errors(spec)]


# ------------------------------------------------------------------------------------ malformed trainer output
_event_types = st.sampled_from(["started", "progress", "metrics", "evaluation", "checkpoint", "artifact",
                                "finished", "failed", "nope"])
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**18, 10**18),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=20)


@st.composite
def _lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["garbage", "partial", "long", "event", "weird-event", "marker-only", "binary"]))
    if kind == "garbage":
        return draw(st.text(max_size=200))
    if kind == "binary":
        return draw(st.binary(max_size=200)).decode("utf-8", "replace")
    if kind == "marker-only":
        return MARKER
    if kind == "long":
        return draw(st.sampled_from(["", MARKER])) + "x" * draw(st.integers(500, 70_000))
    fields = draw(st.dictionaries(st.sampled_from(["epoch", "epochs", "step", "total_steps", "loss", "metrics",
                                                   "uri", "size", "sha256", "stage", "message", "eta_seconds",
                                                   "samples_per_second", "retryable", "resumed_from_step"]),
                                  _json, max_size=6))
    payload = {"v": 1, "type": draw(_event_types), **fields}
    text = MARKER + json.dumps(payload, allow_nan=True)
    if kind == "partial":
        return text[: draw(st.integers(len(MARKER), max(len(MARKER), len(text) - 1)))]
    if kind == "weird-event":
        return text.replace('"v": 1', '"v": "one"', 1) if draw(st.booleans()) else text + "}" * 3
    return text


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(_lines(), min_size=1, max_size=40))
def test_malformed_trainer_output_keeps_status_small_and_valid(lines: list[str]) -> None:
    folder = StatusFolder()
    for i, line in enumerate(lines):
        folder.feed_line(line, 1000.0 + i)
    patch, _ = folder.take_patch()
    body = json.dumps(patch, allow_nan=False)  # the API server gets strict JSON (no NaN/inf)
    assert len(body) < 40_000, len(body)
    assert len(patch.get("logTail", [])) <= 30
    FinetuneRunStatus.model_validate(patch)


def test_event_flood_is_coalesced_and_bounded() -> None:
    # 20,000 events, interleaved partial events and a 1 MB line: one patch, small, with the latest values.
    folder = StatusFolder()
    folder.feed_line(format_event("started", run="r", epochs=10, total_steps=N_FLOOD), 0.0)
    started = time.monotonic()
    for step in range(1, N_FLOOD + 1):
        folder.feed_line(format_event("progress", epoch=1 + step * 10 // (N_FLOOD + 1), epochs=10, step=step,
                                      total_steps=N_FLOOD, loss=1.0 / step), step / 1000)
        if step % 100 == 0:
            folder.feed_line("KUBETUNE_EVENT {\"type\": \"progress\", \"step\": ", step / 1000)
    folder.feed_line("y" * 1_000_000, N_FLOOD / 1000 + 1)
    elapsed = time.monotonic() - started
    patch, times = folder.take_patch()
    assert patch["progress"]["step"] == N_FLOOD and patch["progress"]["percent"] == 100.0
    assert len(times) <= 10_000  # lag samples are bounded too
    assert patch["logTail"].count(patch["logTail"][0]) >= 1 and len(patch["logTail"]) == 30
    assert status_size(patch) < 8_000
    assert max(len(line) for line in patch["logTail"]) <= 500
    print(f"folded {N_FLOOD:,} events in {elapsed:.2f}s ({N_FLOOD / elapsed:,.0f} events/s)")


def _apply_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a status merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _apply_merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def test_a_later_evaluation_replaces_an_earlier_one_on_the_server() -> None:
    # Found by the e2e garbage test: merge patches merged the metric dicts, so a bogus 500-metric "after"
    # followed by the real one became 66 keys, over the schema's maxProperties 64: the API server refused the
    # patch and the run ended with the bogus metrics.
    folder = StatusFolder({"metrics": {"before": {"old": 1.0}}})
    server: dict[str, Any] = {"metrics": {"before": {"old": 1.0}}}
    folder.feed_line(format_event("evaluation", stage="after", metrics={f"m{i}": float(i) for i in range(500)}), 1.0)
    server = _apply_merge_patch(server, folder.take_patch()[0])
    assert len(server["metrics"]["after"]) == 64
    folder.feed_line(format_event("evaluation", stage="after", metrics={"recall_at_k": 0.75, "mrr": 0.5}), 2.0)
    folder.feed_line(format_event("evaluation", stage="before", metrics={"recall_at_k": 0.25}), 2.0)
    patch, times = folder.take_patch()
    folder.requeue(patch, times)  # the server refused or was unreachable: the same change goes out again
    server = _apply_merge_patch(server, folder.take_patch()[0])
    assert server["metrics"]["after"] == {"recall_at_k": 0.75, "mrr": 0.5}
    assert server["metrics"]["before"] == {"recall_at_k": 0.25}
