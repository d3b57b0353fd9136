"""What an exception that ended a trainer run means: its CamelCase reason and exit code (see
:mod:`kubetune.api.events`). Used by the entry point to exit, and by the run to end its tracking runs the same way."""

from __future__ import annotations

from kubetune.api.events import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_FAILED, EXIT_RETRYABLE
from kubetune.storage import StoreError, StoreUnavailable

from .config import ConfigError
from .data import DataError, FetchUnavailable


def classify(exc: BaseException) -> tuple[str, int]:
    """(reason, exit code) for an exception that ended the run."""
    from .model import ModelError
    from .run import CheckpointMissing, NotEnoughData, Preempted

    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str, int]] = [
        (Preempted, "Preempted", EXIT_RETRYABLE),
        ((StoreUnavailable, FetchUnavailable), "StorageUnavailable", EXIT_RETRYABLE),
        (StoreError, "StorageRejected", EXIT_BAD_CONFIG),
        (ConfigError, "InvalidConfig", EXIT_BAD_CONFIG),
        (CheckpointMissing, "CheckpointMissing", EXIT_BAD_CONFIG),
        (ModelError, "InvalidModel", EXIT_BAD_CONFIG),
        ((DataError, NotEnoughData), "InvalidData", EXIT_BAD_DATA),
        (FloatingPointError, "LossDiverged", EXIT_FAILED),
        (MemoryError, "OutOfMemory", EXIT_FAILED),
    ]
    for types, reason, code in table:
        if isinstance(exc, types):
            return reason, code
    if type(exc).__name__ == "OutOfMemoryError":
        return "OutOfMemory", EXIT_FAILED
    return "TrainerError", EXIT_FAILED


def describe(exc: BaseException) -> str:
    """One line for the failed event: ``<type>: <message>``. An exception a DataLoader worker raised comes back
    with the worker's traceback in its message; only its last line (the original exception) is kept."""
    text = str(exc)
    if "Original Traceback" in text:
        text = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), text)
        return text
    return f"{type(exc).__name__}: {text}"
