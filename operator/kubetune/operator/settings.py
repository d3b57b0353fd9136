"""The operator's settings: one explicit object, read from environment variables (a Helm chart sets them).

Pure: no Kubernetes access, no kopf import. :func:`OperatorSettings.from_env` is the only place that reads
the environment; everything else receives the object.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from kubetune.spec import Toleration

ENV_PREFIX = "KUBETUNE_"
#: Fields read from JSON (``KUBETUNE_GPU_NODE_SELECTOR='{"nvidia.com/gpu.present": "true"}'``).
JSON_FIELDS = frozenset({"gpu_node_selector", "gpu_tolerations"})


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """Defaults applied to runs and knobs of the operator itself."""

    #: Trainer image used when a run does not set ``spec.resources.image``.
    trainer_image: str = "kubetune/trainer:0.1.0"
    #: Pull policy used when a run does not set ``spec.resources.imagePullPolicy``.
    image_pull_policy: str = "IfNotPresent"
    #: S3/MinIO endpoint used when a run does not set ``spec.output.endpoint``.
    s3_endpoint: str | None = None
    #: Bucket used when a run does not set ``spec.output.bucket``.
    s3_bucket: str = "kubetune"
    #: Secret (in the run's namespace) with S3 credentials, used when a run sets no credentialsSecret.
    #: Empty: no credentials are passed (e.g. IAM roles for service accounts).
    s3_secret: str | None = "kubetune-s3"
    #: Service account of trainer pods (its token is never mounted). Empty: the namespace's default.
    trainer_service_account: str | None = None
    #: UID/GID the trainer runs as (non-root).
    run_as_user: int = 10001
    #: Size limit of the memory-backed /dev/shm (PyTorch DataLoader workers share tensors through it).
    shm_size: str = "1Gi"
    #: Grace period for the trainer to checkpoint on SIGTERM (suspend, preemption).
    termination_grace_seconds: int = 60
    #: Minimum seconds between two status patches of one run (events in between are coalesced).
    status_interval: float = 1.0
    #: Status patches per second across all runs (token bucket); keeps the API server safe at scale.
    status_qps: float = 50.0
    #: Seconds between TTL checks of finished runs.
    ttl_check_interval: float = 30.0
    #: Node labels required by pods of runs that request GPUs, merged under the run's own
    #: ``spec.resources.nodeSelector`` (the run's value wins for a key both set).
    gpu_node_selector: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    #: Tolerations (Kubernetes form, camelCase) added after the run's own ``spec.resources.tolerations`` to pods
    #: of runs that request GPUs (e.g. for the ``nvidia.com/gpu`` NoSchedule taint).
    gpu_tolerations: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:  # read-only, like the other (frozen) fields
        object.__setattr__(self, "gpu_node_selector", MappingProxyType(dict(self.gpu_node_selector)))
        object.__setattr__(self, "gpu_tolerations",
                           tuple(MappingProxyType(dict(t)) for t in self.gpu_tolerations))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read ``KUBETUNE_<FIELD>`` variables (e.g. ``KUBETUNE_TRAINER_IMAGE``); unset ones keep defaults.
        An empty value means "none" for optional fields."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            raw = env.get(name)
            if raw is None:
                continue
            default = field.default
            if field.name in JSON_FIELDS:
                values[field.name] = _json_value(name, raw, dict if field.name == "gpu_node_selector" else list)
            elif isinstance(default, bool):
                values[field.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
            elif isinstance(default, int):
                values[field.name] = int(raw)
            elif isinstance(default, float):
                values[field.name] = float(raw)
            else:
                values[field.name] = raw or None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.image_pull_policy not in {"Always", "IfNotPresent", "Never"}:
            raise ValueError(f"KUBETUNE_IMAGE_PULL_POLICY: invalid {self.image_pull_policy!r}")
        if self.status_interval <= 0 or self.status_qps <= 0 or self.ttl_check_interval <= 0:
            raise ValueError("KUBETUNE_STATUS_INTERVAL, KUBETUNE_STATUS_QPS, KUBETUNE_TTL_CHECK_INTERVAL must be > 0")
        if not self.trainer_image:
            raise ValueError("KUBETUNE_TRAINER_IMAGE must not be empty")
        for key, value in self.gpu_node_selector.items():
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"KUBETUNE_GPU_NODE_SELECTOR: labels are strings, got {key!r}: {value!r}")
        for i, toleration in enumerate(self.gpu_tolerations):
            try:
                Toleration.model_validate(dict(toleration))  # keys, operators, effects
            except ValueError as e:
                raise ValueError(f"KUBETUNE_GPU_TOLERATIONS[{i}]: {e}") from None


def _json_value(name: str, raw: str, kind: type[dict[str, Any]] | type[list[Any]]) -> Any:
    """A JSON object (``kind=dict``) or array of objects (``kind=list``) from an environment variable; an empty
    value or ``null`` means empty."""
    try:
        value = json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not JSON: {e}") from None
    if value is None:
        return {} if kind is dict else []
    if kind is dict and isinstance(value, dict):
        return value
    if kind is list and isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise ValueError(f"{name}: expected a JSON {'object' if kind is dict else 'array of objects'}")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the API server offers, detected from its version instead of assumed."""

    major: int
    minor: int

    @classmethod
    def from_version(cls, major: str | int, minor: str | int) -> Capabilities:
        """Parse ``/version`` fields; minor may carry a suffix such as ``"20+"``."""
        return cls(int(str(major).rstrip("+") or 1), int("".join(c for c in str(minor) if c.isdigit()) or 0))

    def at_least(self, minor: int) -> bool:
        return (self.major, self.minor) >= (1, minor)

    @property
    def job_suspend(self) -> bool:
        """``Job.spec.suspend`` (1.21+); Kueue needs it to hold and admit Jobs."""
        return self.at_least(21)

    @property
    def job_ttl_after_finished(self) -> bool:
        """``Job.spec.ttlSecondsAfterFinished`` enabled by default (beta 1.21, GA 1.23)."""
        return self.at_least(21)

    @property
    def pod_failure_policy(self) -> bool:
        """``Job.spec.podFailurePolicy`` enabled by default (beta 1.26)."""
        return self.at_least(26)

    def summary(self) -> str:
        return (f"Kubernetes {self.major}.{self.minor}: job_suspend={self.job_suspend} "
                f"job_ttl={self.job_ttl_after_finished} pod_failure_policy={self.pod_failure_policy}")
