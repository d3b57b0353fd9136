"""The names and labels a run's Kubernetes objects carry: shared by the operator (which sets them) and the SDK
(which selects by them). Deterministic, so that a restarted operator finds (and adopts) what it created."""

from __future__ import annotations

import hashlib

RUN_LABEL = "kubetune.io/run"
ATTEMPT_LABEL = "kubetune.io/attempt"
RUN_NAME_ANNOTATION = "kubetune.io/run-name"
RUN_UID_ANNOTATION = "kubetune.io/run-uid"

_LABEL_MAX = 63
_NAME_MAX = 253


def _shorten(name: str, limit: int) -> str:
    """``name`` if it fits, else a prefix plus a stable hash (names stay unique and deterministic)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:limit - 9].rstrip('-.')}-{digest}"


def run_label(name: str) -> str:
    """The ``kubetune.io/run`` label value for a run (label values are at most 63 characters)."""
    return _shorten(name, _LABEL_MAX)


def job_name(name: str, attempt: int) -> str:
    """Deterministic Job name of one attempt. At most 63 characters (the Job controller copies it into a
    pod label)."""
    suffix = f"-a{attempt}"
    return _shorten(name, _LABEL_MAX - len(suffix)) + suffix


def config_map_name(name: str) -> str:
    suffix = "-config"
    return _shorten(name, _NAME_MAX - len(suffix)) + suffix
