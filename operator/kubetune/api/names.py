"""The names and labels a run's Kubernetes objects carry: shared by the operator (which sets them) and the SDK
(which selects by them). Deterministic, so that a restarted operator finds (and adopts) what it created."""

from __future__ import annotations

import hashlib
import string

from kubetune.api.errors import ConfigInvalid

RUN_LABEL = "kubetune.io/run"
ATTEMPT_LABEL = "kubetune.io/attempt"
NODE_RANK_LABEL = "kubetune.io/node-rank"
#: What the Job controller writes on each pod of an Indexed Job (1.21+): its index, the pod's node rank.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RUN_NAME_ANNOTATION = "kubetune.io/run-name"
RUN_UID_ANNOTATION = "kubetune.io/run-uid"

_LABEL_MAX = 63
_NAME_MAX = 253
_NAME_CHARS = frozenset(string.ascii_lowercase + string.digits + "-.")
NAME_RULES = (f"a FinetuneRun's name is a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each "
              f"'.'-separated part starting and ending with a letter or digit, at most {_NAME_MAX} characters "
              "(e.g. shoes-v2)")


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


def worker_job_name(name: str, attempt: int, node_rank: int) -> str:
    """The Job of node rank ``node_rank`` of a run over several pods without Indexed Jobs: rank 0's is the
    attempt's Job (:func:`job_name`), the others' add ``-n<rank>``."""
    if node_rank == 0:
        return job_name(name, attempt)
    suffix = f"-a{attempt}-n{node_rank}"
    return _shorten(name, _LABEL_MAX - len(suffix)) + suffix


def rendezvous_service_name(name: str, attempt: int) -> str:
    """The Service of one attempt's rank 0 (its rendezvous). A Service name is a DNS-1035 label: a letter first,
    no dots; a name with dots is made unique by a hash."""
    suffix = f"-a{attempt}"
    base = name.replace(".", "-")
    if base != name:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        base = f"{base[:_LABEL_MAX - 3 - len(suffix) - 9].rstrip('-')}-{digest}"
    return "kt-" + _shorten(base, _LABEL_MAX - 3 - len(suffix)) + suffix


def run_name_problem(name: object) -> str | None:
    """Why the API server would refuse ``name`` as a FinetuneRun's ``metadata.name``; None when it is fine."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "it is empty"
    if len(name) > _NAME_MAX:
        return f"it is {len(name)} characters long, the most is {_NAME_MAX}"
    bad = sorted(set(name) - _NAME_CHARS)
    if bad:
        return "it contains " + " ".join(repr(c) for c in bad)
    for part in name.split("."):
        if not part:
            return "it starts or ends with '.', or has '..'"
        if part.startswith("-") or part.endswith("-"):
            return f"{part!r} starts or ends with '-'"
    return None


def check_run_name(name: object) -> str:
    """``name`` when it can name a FinetuneRun, else :class:`ConfigInvalid` saying why. The SDK checks before it
    uploads anything, because the name is part of where the uploads go."""
    problem = run_name_problem(name)
    if problem is not None:
        raise ConfigInvalid(f"metadata.name (run name) {name!r:.80} is not a valid FinetuneRun name: {problem}",
                            NAME_RULES)
    assert isinstance(name, str)
    return name
