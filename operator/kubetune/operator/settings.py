"""The operator's settings: one explicit object, read from environment variables (a Helm chart sets them).

Pure: no Kubernetes access, no kopf import. :func:`OperatorSettings.from_env` is the only place that reads
the environment; everything else receives the object. Constructing :class:`OperatorSettings` directly reads
nothing but its arguments, so a test or a caller gets the same object whatever the process environment holds.

Field ``name`` is read from ``KUBETUNE_<NAME>`` (``trainer_image`` → ``KUBETUNE_TRAINER_IMAGE``) by
pydantic-settings and typed by the field's annotation: ``int``/``float``/``str`` parse as such, the mapping and
the tuple are JSON, an empty value means none for optional fields and "no defaults" for the JSON ones. An invalid
value is a ``ValueError`` naming the variable and the reason, on one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from kubetune.api.spec import QUANTITY_PATTERN, Toleration
from kubetune.api.trainer_env import MODEL_MIRROR_PATTERN

if TYPE_CHECKING:
    from kubetune.lifecycle.policy import PlatformPolicy

ENV_PREFIX = "KUBETUNE_"


def variable(field_name: str) -> str:
    """The environment variable of an :class:`OperatorSettings` field (``s3_bucket`` → ``KUBETUNE_S3_BUCKET``)."""
    return ENV_PREFIX + field_name.upper()


def _empty_is_none(value: Any) -> Any:
    # The chart renders an unset optional value as "" (e.g. KUBETUNE_S3_SECRET="": pass no credentials).
    return None if isinstance(value, str) and not value.strip() else value


def _json_object(value: Any) -> Any:
    if value is None:  # JSON null
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a JSON object, got {_json_kind(value)}")
    return value


def _json_array(value: Any) -> Any:
    if value is None:  # JSON null
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a JSON array of objects, got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (Mapping, "an object"),
                       ((list, tuple), "an array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _json_strings(value: Any) -> Any:
    if value is None:  # JSON null
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a JSON array of strings, got {_json_kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a JSON array of strings, got {_json_kind(item)} in it")
    return value


def _names(value: tuple[str, ...]) -> tuple[str, ...]:
    if any(not v.strip() for v in value):
        raise ValueError("an empty name allows nothing: leave it out")
    return value


def _image_patterns(value: tuple[str, ...]) -> tuple[str, ...]:
    # imported here: kubetune.lifecycle imports the manifests, which import these settings
    from kubetune.lifecycle.policy import image_pattern_problem

    problems = [p for p in map(image_pattern_problem, value) if p]
    if problems:
        raise ValueError("; ".join(problems))
    return value


def _node_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    if any(not key for key in value):
        raise ValueError("a node label key must not be empty")
    return MappingProxyType(dict(value))  # read-only, like the other (frozen) fields


def _toleration(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # Kept in the Kubernetes form the chart passes (camelCase, only the keys given), validated like a run's own
    # spec.resources.tolerations so that a bad default fails at startup, not on every GPU run's Job.
    try:
        Toleration.model_validate(dict(value))
    except ValidationError as e:
        reasons = [_message(error, ".".join(map(str, error["loc"]))) for error in e.errors()]
        raise ValueError("; ".join(reasons)) from None
    return MappingProxyType(dict(value))


def _model_mirror(value: str | None) -> str | None:
    # the trainer's own rule (kubetune.api.trainer_env): the operator must never pass a mirror the trainer refuses
    if value is not None and not re.match(MODEL_MIRROR_PATTERN, value):
        raise ValueError(f"expected s3://bucket[/prefix], got {value!r}")
    return value


OptionalStr = Annotated[str | None, BeforeValidator(_empty_is_none)]
StringList = Annotated[tuple[str, ...], BeforeValidator(_json_strings), AfterValidator(_names)]
PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class OperatorSettings(BaseSettings):
    """Defaults applied to runs and knobs of the operator itself."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    trainer_image: Annotated[str, Field(min_length=1, description=(
        "Trainer image used when a run does not set spec.resources.image."))] = "kubetune/trainer:0.1.0"
    image_pull_policy: Annotated[Literal["Always", "IfNotPresent", "Never"], Field(description=(
        "Pull policy used when a run does not set spec.resources.imagePullPolicy."))] = "IfNotPresent"
    s3_endpoint: Annotated[OptionalStr, Field(description=(
        "S3/MinIO endpoint used when a run does not set spec.output.endpoint."))] = None
    s3_bucket: Annotated[str, Field(min_length=1, description=(
        "Bucket used when a run does not set spec.output.bucket."))] = "kubetune"
    s3_secret: Annotated[OptionalStr, Field(description=(
        "Secret (in the run's namespace) with S3 credentials, used when a run sets no credentialsSecret. "
        "Empty: no credentials are passed (e.g. IAM roles for service accounts)."))] = "kubetune-s3"
    model_mirror: Annotated[OptionalStr, AfterValidator(_model_mirror), Field(description=(
        "Model mirror (s3://bucket/prefix on the runs' S3 endpoint) that trainers read pretrained weights from "
        "before the hub, passed to them as KUBETUNE_MODEL_MIRROR; filled by `kubetune models stage`. Empty: "
        "the hub only."))] = None
    trainer_service_account: Annotated[OptionalStr, Field(description=(
        "Service account of trainer pods (its token is never mounted). Empty: the namespace's default."))] = None
    run_as_user: Annotated[int, Field(ge=0, description="UID/GID the trainer runs as (non-root).")] = 10001
    shm_size: Annotated[str, Field(pattern=QUANTITY_PATTERN, description=(
        "Size limit (a Kubernetes quantity) of the memory-backed /dev/shm (PyTorch DataLoader workers share "
        "tensors through it)."))] = "1Gi"
    ephemeral_storage: Annotated[str, Field(pattern=QUANTITY_PATTERN, description=(
        "Local disk (a Kubernetes quantity) of trainer pods whose run sets no spec.resources.ephemeralStorage: "
        "the size limit of the scratch /tmp and the container's ephemeral-storage request and limit."))] = "20Gi"
    termination_grace_seconds: Annotated[int, Field(ge=0, description=(
        "Grace period for the trainer to checkpoint on SIGTERM (suspend, preemption)."))] = 60
    status_interval: Annotated[PositiveNumber, Field(description=(
        "Minimum seconds between two status patches of one run (events in between are coalesced)."))] = 1.0
    status_qps: Annotated[PositiveNumber, Field(description=(
        "Status patches per second across all runs (token bucket); keeps the API server safe at scale."))] = 50.0
    ttl_check_interval: Annotated[PositiveNumber, Field(description=(
        "Seconds between TTL checks of finished runs."))] = 30.0
    gpu_node_selector: Annotated[
        Mapping[str, str], BeforeValidator(_json_object), AfterValidator(_node_labels),
    ] = Field(default_factory=lambda: MappingProxyType({}), description=(
        "Node labels (a JSON object) required by pods of runs that request GPUs, merged under the run's own "
        "spec.resources.nodeSelector (the run's value wins for a key both set)."))
    gpu_tolerations: Annotated[
        tuple[Annotated[Mapping[str, Any], AfterValidator(_toleration)], ...], BeforeValidator(_json_array),
    ] = Field(default=(), description=(
        "Tolerations (a JSON array, Kubernetes form, camelCase) added after the run's own "
        "spec.resources.tolerations to pods of runs that request GPUs (e.g. for the nvidia.com/gpu NoSchedule "
        "taint)."))
    allowed_images: Annotated[StringList, AfterValidator(_image_patterns)] = Field(default=(), description=(
        "Platform allow-list (a JSON array): images a run may set in spec.resources.image, exact or ending in "
        "/* (anything under that path), :* (any tag) or @* (any digest). Empty: any image. The default trainer "
        "image is always allowed."))
    allowed_priority_classes: StringList = Field(default=(), description=(
        "Platform allow-list (a JSON array): PriorityClasses a run may set in spec.resources.priorityClassName. "
        "Empty: any."))
    allowed_toleration_keys: StringList = Field(default=(), description=(
        "Platform allow-list (a JSON array): taint keys a run's own spec.resources.tolerations may name (a "
        "toleration without a key is then refused). Empty: any. The GPU tolerations above are always added."))
    max_gpus_per_run: Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_empty_is_none), Field(description=(
        "Most GPUs (spec.resources.gpus) one run may request. Empty: no limit."))] = None

    def platform_policy(self) -> PlatformPolicy:
        """The allow-list the operator admits runs with (:func:`kubetune.lifecycle.policy.admission`). The
        operator's own defaults are the platform's: the default trainer image and the GPU tolerations' keys are
        allowed with any list (a spec read back from a Job has them filled in)."""
        from kubetune.lifecycle.policy import PlatformPolicy  # see _image_patterns

        images = (*self.allowed_images, self.trainer_image) if self.allowed_images else ()
        keys = self.allowed_toleration_keys
        if keys:
            keys = (*keys, *(str(t.get("key") or "") for t in self.gpu_tolerations))
        return PlatformPolicy(images=images, priority_classes=self.allowed_priority_classes, toleration_keys=keys,
                              max_gpus=self.max_gpus_per_run)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the constructor's arguments: from_env is the one reader of the environment (see the module doc).
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read ``KUBETUNE_<FIELD>`` variables from ``env`` (default: ``os.environ``); unset ones keep defaults.
        Raises ``ValueError`` naming each invalid variable and why."""
        try:
            return cls(**_Environment(cls, os.environ if env is None else env)())
        except ValidationError as e:
            raise ValueError("; ".join(_message(error, _variable_path(error)) for error in e.errors())) from None
        except ValueError as e:  # pydantic-settings' SettingsError: a JSON value that did not decode
            raise ValueError(str(e.__cause__ or e)) from None


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source (prefix, typed JSON decoding of complex fields) over an explicit
    mapping, so that callers and tests can pass their own environment."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The hook pydantic-settings' own dotenv source overrides to read somewhere other than os.environ.
        return {name if self.case_sensitive else name.lower(): value for name, value in self._env.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None  # empty: no defaults (the field keeps its empty default)
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as e:
            raise ValueError(f"{variable(field_name)}: not JSON: {e}") from None


def _variable_path(error: ErrorDetails) -> str:
    """``KUBETUNE_GPU_TOLERATIONS[0]`` for an error at ``("gpu_tolerations", 0)``."""
    field, *path = error["loc"]
    return variable(str(field)) + "".join(f"[{p}]" if isinstance(p, int) else f"[{json.dumps(p)}]" for p in path)


def _message(error: ErrorDetails, where: str) -> str:
    ctx = error.get("ctx") or {}
    message = str(ctx["error"]) if error["type"] == "value_error" and "error" in ctx else error["msg"]
    value = error.get("input")
    if isinstance(value, (str, int, float)):  # scalars only: the reader sees what was wrong
        shown = repr(value)
        message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return f"{where}: {message}" if where else message


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
    def indexed_job(self) -> bool:
        """``completionMode: Indexed`` Jobs, on by default (beta 1.22, GA 1.24)."""
        return self.at_least(22)

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
