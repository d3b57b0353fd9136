"""Validating a spec, and the one way its errors are written: ``spec.<camelCase path>: <reason>``, joined by
``; `` — the same text in a run's InvalidSpec condition and Event, the CLI's ``error:`` line, the SDK's
:class:`kubetune.api.errors.ConfigInvalid` and the trainer's exit-78 message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubetune.api.spec import FinetuneRunSpec

FieldError = tuple[str, str]  # (field path, reason)


def spec_errors(exc: ValidationError) -> list[FieldError]:
    """(field path, reason) of each error. Field errors carry their camelCase path (``spec.training.epochs``);
    the model-level (cross-field) validator reports "path: reason; path: reason", split back into pairs."""
    errors: list[FieldError] = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ())).lstrip(".")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:
            for part in msg.split("; "):
                path, sep, reason = part.partition(": ")
                errors.append((path, reason) if sep and path.startswith("spec.") else ("spec", part))
        else:
            errors.append((f"spec.{loc}", msg))
    return errors


def validate_spec(body: Mapping[str, Any] | Any) -> tuple[FinetuneRunSpec | None, list[FieldError]]:
    """(model, []) for a valid spec, (None, errors) otherwise. Pure."""
    if not isinstance(body, Mapping):
        return None, [("spec", f"expected a mapping, got {type(body).__name__}")]
    try:
        return FinetuneRunSpec.model_validate(dict(body)), []
    except ValidationError as exc:
        return None, spec_errors(exc)


def format_errors(errors: list[FieldError]) -> str:
    return "; ".join(f"{path}: {reason}" for path, reason in errors)
