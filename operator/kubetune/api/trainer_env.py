"""The trainer's environment contract: every ``KUBETUNE_*`` variable a trainer container reads, in one place.

The operator builds a trainer pod's ``KUBETUNE_*`` variables with :meth:`TrainerEnv.to_env`
(:mod:`kubetune.operator.manifests`); the trainer reads them once, with :meth:`TrainerEnv.from_env`, and nowhere else.
The stand-in test image (``tests/images/standin/standin.py``, stdlib only, so it cannot import this module)
reads a subset of the same names; a unit test holds the trainer, the stand-in and the manifests to this list.
Variables the trainer reads that are not kubetune's own (``RANK``/``WORLD_SIZE`` from torchrun, ``AWS_*``,
``HOME``) are not part of it.

==========================  =====================================  ==============================================
variable                    set by                                 what the trainer does with it
==========================  =====================================  ==============================================
KUBETUNE_CONFIG             operator (the downward API volume      reads the run config from that path (``--config``
                            of the Job's run-config annotation),   wins)
                            the trainer image
KUBETUNE_RUN_NAME           operator                               run name when neither ``--run-name`` nor the
                                                                   config's ``metadata.name`` gives one
KUBETUNE_RUN_NAMESPACE      operator                               namespace when neither ``--namespace`` nor
                                                                   ``metadata.namespace`` gives one
KUBETUNE_RUN_UID            operator                               refuses to run (exit 78, ``InvalidConfig``) when
                                                                   the config's ``metadata.uid`` differs: a stale
                                                                   config of an earlier same-named run
KUBETUNE_ATTEMPT            operator                               reported in the ``started`` event
KUBETUNE_RESUME_FROM        operator (the run's last checkpoint)   the trainer always resumes from its store's
                                                                   ``checkpoints/latest.json``; when this is set
                                                                   and the store has no checkpoint it fails
                                                                   (exit 78, ``CheckpointMissing``) instead of
                                                                   training from scratch
KUBETUNE_WORK_DIR           the trainer image (Dockerfile ENV)     scratch directory (``--work-dir`` wins)
KUBETUNE_PROGRESS_SECONDS   operator (the default), local mode     at most one ``progress`` event per this many
                            (1), tests                             seconds (0: every step)
KUBETUNE_LOG_LEVEL          operator (the default), the user's     level of the human log on stderr
                            shell in local mode
KUBETUNE_TERMINATION_LOG    operator (= the pod's                  where rank 0 writes the final summary
                            ``terminationMessagePath``)            (:func:`kubetune.api.events.termination_message`)
                                                                   on every exit
KUBETUNE_MODEL_MIRROR       operator (Helm value                   reads pretrained weights from
                            ``runDefaults.models.mirror``),        ``<mirror>/<NAME>/<TAG>/`` (sha256-checked) before
                            the user's shell in local mode         trying the hub (:mod:`kubetune.api.models`)
KUBETUNE_NODE_RANK          operator (runs over several pods: the  this pod's node rank for torchrun
                            literal rank, or an Indexed Job's      (``--node-rank``); rank 0 hosts the rendezvous
                            completion index)
KUBETUNE_RENDEZVOUS         operator (runs over several pods)      ``host:port`` of rank 0's rendezvous
                                                                   (``--master-addr``/``--master-port``)
==========================  =====================================  ==============================================

The operator sets every field that has a value, defaults included, so a pod's spec shows all of them and an
image built with other defaults behaves the same. An empty value counts as unset (Kubernetes lets a manifest
set ``value: ""``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "KUBETUNE_"
DEFAULT_CONFIG = "/etc/kubetune/run.yaml"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# what Kubernetes accepts as an object name (RFC 1123 subdomain): the operator must never fail to build a pod
# for a run the API server took
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_NAME_MAX = 253
#: Where node rank 0's torchrun hosts the rendezvous (its c10d TCPStore) of a run over several pods.
RENDEZVOUS_PORT = 29500
RENDEZVOUS_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?:[0-9]{1,5}$"
MODEL_MIRROR_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?$"


def variable(field_name: str) -> str:
    """The environment variable of a :class:`TrainerEnv` field (``run_uid`` → ``KUBETUNE_RUN_UID``)."""
    return PREFIX + field_name.upper()


@dataclass(frozen=True)
class TrainerEnv:
    """The ``KUBETUNE_*`` variables of a trainer container, typed and validated (``ValueError`` names the
    variable)."""

    config: str = DEFAULT_CONFIG
    """``KUBETUNE_CONFIG``: path of the run config (a FinetuneRun, YAML or JSON)."""

    run_name: str | None = None
    """``KUBETUNE_RUN_NAME``: the FinetuneRun's name; a fallback behind ``--run-name`` and ``metadata.name``."""

    run_namespace: str | None = None
    """``KUBETUNE_RUN_NAMESPACE``: the FinetuneRun's namespace; a fallback behind ``--namespace`` and
    ``metadata.namespace``."""

    run_uid: str | None = None
    """``KUBETUNE_RUN_UID``: the FinetuneRun's uid. When set, the config's ``metadata.uid`` must equal it: a
    config left from a deleted run of the same name would otherwise train the wrong spec into the new run's
    store."""

    attempt: int = 1
    """``KUBETUNE_ATTEMPT``: the operator's attempt number (1-based), reported in the ``started`` event."""

    resume_from: str | None = None
    """``KUBETUNE_RESUME_FROM``: the last checkpoint the operator saw this run write. The trainer resumes from
    its store's ``checkpoints/latest.json`` (at least as new as this one); when this is set and the store has
    no checkpoint, the run fails instead of silently starting over."""

    work_dir: str | None = None
    """``KUBETUNE_WORK_DIR``: scratch directory (downloads, checkpoints in flight); ``--work-dir`` wins.
    Unset: ``<output-dir>/.work`` in local mode, else ``/tmp/kubetune``."""

    progress_seconds: float = 5.0
    """``KUBETUNE_PROGRESS_SECONDS``: minimum seconds between two ``progress`` events (0: one per step)."""

    log_level: str = "INFO"
    """``KUBETUNE_LOG_LEVEL``: level of the human log on stderr (DEBUG, INFO, WARNING, ERROR, CRITICAL)."""

    termination_log: str | None = None
    """``KUBETUNE_TERMINATION_LOG``: file rank 0 writes the final summary to when it exits. Unset:
    ``/dev/termination-log``, and only when that file exists (the kubelet creates it in every container), so a
    trainer on a workstation never creates files under ``/dev``."""

    model_mirror: str | None = None
    """``KUBETUNE_MODEL_MIRROR``: the model mirror, ``s3://bucket/prefix`` on the run's S3 endpoint, where
    ``kubetune models stage`` put pretrained weights for clusters without internet. Unset: the hub only."""

    node_rank: int | None = None
    """``KUBETUNE_NODE_RANK``: this pod's rank among the run's pods (``spec.resources.nodes`` > 1)."""
    rendezvous: str | None = None
    """``KUBETUNE_RENDEZVOUS``: ``host:port`` where rank 0's torchrun hosts the rendezvous of a run over several
    pods (rank 0 itself listens on the port and reaches it on the loopback)."""

    def __post_init__(self) -> None:
        if self.node_rank is not None and (isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int)
                                           or self.node_rank < 0):
            raise ValueError(f"{variable('node_rank')}: expected an integer >= 0, got {self.node_rank!r}")
        if self.rendezvous is not None and (not isinstance(self.rendezvous, str)
                                            or not re.match(RENDEZVOUS_PATTERN, self.rendezvous)):
            raise ValueError(f"{variable('rendezvous')}: expected host:port, got {self.rendezvous!r}")
        if self.model_mirror is not None and (not isinstance(self.model_mirror, str)
                                              or not re.match(MODEL_MIRROR_PATTERN, self.model_mirror)):
            raise ValueError(f"{variable('model_mirror')}: expected s3://bucket[/prefix], got {self.model_mirror!r}")
        for name in ("config", "run_uid", "resume_from", "work_dir", "termination_log"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{variable(name)}: expected a non-empty string, got {value!r}")
        for name in ("run_name", "run_namespace"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _NAME.match(value)
                                      or len(value) > _NAME_MAX):
                raise ValueError(f"{variable(name)}: {value!r} is not a valid Kubernetes name")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise ValueError(f"{variable('attempt')}: expected an integer >= 1, got {self.attempt!r}")
        seconds = self.progress_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"{variable('progress_seconds')}: expected a number of seconds >= 0, got {seconds!r}")
        level = self.log_level.upper() if isinstance(self.log_level, str) else self.log_level
        if level not in LOG_LEVELS:
            raise ValueError(f"{variable('log_level')}: expected one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        object.__setattr__(self, "log_level", level)
        object.__setattr__(self, "progress_seconds", float(seconds))

    @classmethod
    def variables(cls) -> tuple[str, ...]:
        """Every variable of the contract, in field order."""
        return tuple(variable(f.name) for f in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TrainerEnv:
        """Read the contract's variables from ``env`` (``os.environ`` in the trainer); others are ignored."""
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = variable(f.name)
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            kind = hints[f.name]
            if kind is int or kind == (int | None):
                try:
                    values[f.name] = int(raw.strip())
                except ValueError:
                    raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
            elif kind is float:
                try:
                    values[f.name] = float(raw.strip())
                except ValueError:
                    raise ValueError(f"{name}: expected a number, got {raw!r}") from None
            else:
                values[f.name] = raw
        return cls(**values)

    def to_env(self) -> list[dict[str, str]]:
        """Kubernetes ``EnvVar`` objects for every field that is set (unset optional fields are left out)."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out.append({"name": variable(f.name), "value": repr(value) if isinstance(value, float) else str(value)})
        return out

    def termination_log_path(self) -> str | None:
        """Where the final summary goes: the configured file, else the kubelet's one if it exists, else None."""
        if self.termination_log is not None:
            return self.termination_log
        return DEFAULT_TERMINATION_LOG if os.path.exists(DEFAULT_TERMINATION_LOG) else None


__all__ = ["DEFAULT_CONFIG", "DEFAULT_TERMINATION_LOG", "LOG_LEVELS", "MODEL_MIRROR_PATTERN", "PREFIX",
           "RENDEZVOUS_PORT", "TrainerEnv", "variable"]
