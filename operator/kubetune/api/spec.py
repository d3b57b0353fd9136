"""The FinetuneRun model: the single source of truth for the CRD schema, the SDK, the operator and the trainer.

Field names are snake_case in Python and camelCase in YAML/JSON (the Kubernetes convention); both are
accepted on input. Every field carries a description (it becomes `kubectl explain` text), a default and
bounds. `FinetuneRunSpec.model_validate(obj)` is how every component reads a spec, so a spec that the API
server accepts is one the trainer accepts. Cross-field rules that an OpenAPI schema cannot express live in
`cross_field_errors` and are applied by the operator (condition + Event, no Job) and by the SDK/trainer.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune.api.models import DEFAULT_NAME, resolve_pretrained

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FinetuneRun"
PLURAL = "finetuneruns"
SINGULAR = "finetunerun"
SHORT_NAMES = ("ftr",)
API_VERSION = f"{GROUP}/{VERSION}"

URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|https?://.+|file://.+|/.+|[^:]+)$"
QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$"
_NUMBER_TYPES: tuple[Any, ...] = (int, float, int | None, float | None)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_enum_values=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1; the API server (OpenAPI type integer/number) rejects it, so do we.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in _NUMBER_TYPES:
                raise ValueError("Input should be a number, not a boolean")
        return value

    def dump(self) -> dict[str, Any]:
        """camelCase JSON-ready dict without unset optional fields (what goes into a manifest)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    AMP = "amp"
    AMP_BF16 = "amp_bf16"
    BF16 = "bf16"


class Loss(str, Enum):
    CLIP = "CLIPLoss"
    SIGLIP = "SigLIPLoss"


class Optimizer(str, Enum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class Scheduler(str, Enum):
    COSINE = "cosine"
    CONSTANT = "constant"
    LINEAR = "linear"


class DataFormat(str, Enum):
    AUTO = "auto"
    CSV = "csv"
    DOCLIST = "doclist"
    WEBDATASET = "webdataset"


class Distance(str, Enum):
    COSINE = "cosine"
    EUCLIDEAN = "euclidean"
    SQEUCLIDEAN = "sqeuclidean"


class Mode(str, Enum):
    MIN = "min"
    MAX = "max"


class ModelSpec(_Model):
    name: Annotated[str, Field(min_length=1, max_length=200, description=(
        "open_clip model name, e.g. ViT-B-32 or xlm-roberta-base-ViT-B-32; with `config`, the name the "
        "custom config is registered under. With `weights` naming a kubetune artifact, leave it (and config) "
        "unset to continue as the artifact's model."))] = DEFAULT_NAME
    pretrained: Annotated[str | None, Field(max_length=200, description=(
        "open_clip pretrained tag (e.g. laion2b_s34b_b79k), read from the model mirror (Helm value "
        "runDefaults.models.mirror) or else the hub. Unset: the model's default tag (`kubetune models`); a custom "
        "`config` or `weights` have none. `random` for a random init."))] = None
    weights: Annotated[str | None, Field(max_length=2048, description=(
        "Starting weights: an s3:// URI, an http(s) URL or a local path to a .pt/.safetensors state dict, "
        "or a kubetune artifact (continue from an earlier run: its model name and config are used unless "
        "name or config are set). Loaded with weights_only=True."))] = None
    config: Annotated[dict[str, Any] | None, Field(description=(
        "A custom open_clip model config (embed_dim, vision_cfg, text_cfg), e.g. a tiny model for tests. "
        "When set, `name` is registered with this config; it starts from a random init unless `pretrained` or "
        "`weights` is set."),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})] = None

    def pretrained_tag(self) -> str | None:
        """The tag this model starts from, None for none (:func:`kubetune.api.models.resolve_pretrained`)."""
        return resolve_pretrained(self.name, self.pretrained, self.weights, self.config)


class DataSpec(_Model):
    train: Annotated[str, Field(min_length=1, max_length=2048, description=(
        "Training pairs: a CSV of (text, image) rows or a docarray DocList serialised as protobuf; "
        "an s3:// URI, http(s) URL or local path."))]
    eval: Annotated[str | None, Field(max_length=2048, description=(
        "Evaluation pairs for validation loss (same formats as train). Exclusive with valSplit."))] = None
    query: Annotated[str | None, Field(max_length=2048, description=(
        "Query set for retrieval evaluation (texts with the image they should find). Defaults to eval "
        "data, or the validation split."))] = None
    index: Annotated[str | None, Field(max_length=2048, description=(
        "Index set for retrieval evaluation (the images searched). Defaults to the query set's images."))] = None
    format: Annotated[DataFormat, Field(description=(
        "Data format: auto (by extension: .csv, a .tar shard or pattern of shards, else DocList protobuf), csv, "
        "doclist or webdataset (tar shards of {key}.jpg + {key}.txt as open_clip reads them, streamed: "
        "train is a brace pattern such as s3://b/shards/{000000..000099}.tar or a prefix ending in /; "
        "kubetune data shard writes them)."))] = DataFormat.AUTO
    val_split: Annotated[float, Field(ge=0.0, le=0.5, description=(
        "Fraction of train held out for validation and evaluation when no eval data is given."))] = 0.0
    text_column: Annotated[str, Field(min_length=1, max_length=100, description=(
        "CSV column holding the text."))] = "text"
    image_column: Annotated[str, Field(min_length=1, max_length=100, description=(
        "CSV column holding the image URI (s3://, http(s)://, file path relative to the CSV)."))] = "image"
    skip_bad_rows: Annotated[bool, Field(description=(
        "Skip and count rows whose image is missing or unreadable instead of failing the run."))] = False
    bad_row_limit: Annotated[float, Field(ge=0.0, le=1.0, description=(
        "With skipBadRows: the run fails once more than this fraction of the rows read so far (at least 100 read) "
        "were skipped, since a set that broken is more likely a wrong path or column than noise."))] = 0.01
    check_rows_up_to: Annotated[int, Field(ge=0, le=10_000_000, description=(
        "Sets of up to this many rows have every image fetched and decoded before the first step, so a broken row "
        "fails the run at once; larger sets are read lazily in the loader workers and each bad row is met (and "
        "named) when it is first read. 0: always lazy."))] = 5000
    cache_size: Annotated[str | None, Field(pattern=QUANTITY_PATTERN, max_length=20, description=(
        "Local disk (a Kubernetes quantity) for remote images and shards fetched by the trainer, evicted least "
        "recently used. Empty: half of the pod's ephemeral storage (resources.ephemeralStorage), else 10Gi."))] = None
    shuffle_buffer: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "webdataset: samples held per loader worker to shuffle within (shard order is shuffled per epoch too)."
    ))] = 1000
    reference: Annotated[str | None, Field(max_length=2048, description=(
        "Pairs of a domain the model must not forget (e.g. general-purpose captions), same formats as train: "
        "the WiSE-FT sweep measures retrieval on it (its texts query its images)."))] = None
    zero_shot: Annotated[str | None, Field(max_length=2048, description=(
        "A labelled image set for zero-shot classification, same formats as train with each image's class name "
        "in the text column: top-1/top-5 accuracy before and after fine-tuning and at every WiSE-FT α, so that "
        "robustness beyond retrieval is measured. Prompts: callbacks.evaluation.zeroShotTemplates."))] = None


class TrainingSpec(_Model):
    epochs: Annotated[int, Field(ge=1, le=1000, description="Number of passes over the training data.")] = 5
    batch_size: Annotated[int, Field(ge=2, le=65536, description=(
        "Pairs per micro-batch per process (GPU). gradAccumulation follows open_clip's --accum-freq: each "
        "optimizer step sees batchSize × gradAccumulation pairs per process (× processes under DDP) and the "
        "contrastive loss is computed over all of them. Contrastive losses need at least 2."))] = 64
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0, description="Peak learning rate.")] = 1e-5
    optimizer: Annotated[Optimizer, Field(description="Optimizer.")] = Optimizer.ADAMW
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0, description=(
        "Weight decay; never applied to biases, norms, embeddings' gains or logit_scale."))] = 0.1
    scheduler: Annotated[Scheduler, Field(description="Learning-rate schedule after warmup.")] = Scheduler.COSINE
    warmup_steps: Annotated[int, Field(ge=0, le=10_000_000, description="Linear warmup steps.")] = 0
    precision: Annotated[Precision, Field(description=(
        "Numeric precision: auto (amp_bf16 on GPUs that support it, fp32 on CPU), fp32, amp, amp_bf16, "
        "bf16."))] = Precision.AUTO
    grad_accumulation: Annotated[int, Field(ge=1, le=1024, description=(
        "Micro-batches of batchSize per optimizer step (open_clip's --accum-freq: their features are cached "
        "so the loss sees batchSize × gradAccumulation pairs)."))] = 1
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Random seed.")] = 42
    lock_image: Annotated[bool, Field(description="Freeze the image tower.")] = False
    lock_text: Annotated[bool, Field(description="Freeze the text tower.")] = False
    loss: Annotated[Loss, Field(description="Contrastive loss: CLIPLoss or SigLIPLoss.")] = Loss.CLIP
    max_steps: Annotated[int | None, Field(ge=1, description=(
        "Stop after this many optimizer steps (for smoke tests); default: epochs × steps per epoch."))] = None
    num_workers: Annotated[int, Field(ge=0, le=64, description="Data-loading worker processes.")] = 2
    grad_clip_norm: Annotated[float | None, Field(gt=0.0, description="Clip gradients to this norm.")] = None
    collective_timeout_seconds: Annotated[int, Field(ge=5, le=86400, description=(
        "Several processes: how long one waits for the others inside a training step before the attempt fails "
        "(a hung or lost rank). Rank 0's solo phases (evaluation, validation, checkpoint upload, export) are not "
        "bound by it: the other ranks wait for those up to max(this, 1800 s + output.retrySeconds + 0.1 s per "
        "evaluation and validation item)."))] = 600


class EvaluationSpec(_Model):
    enabled: Annotated[bool, Field(description="Evaluate retrieval before and after training.")] = True
    zero_shot_templates: Annotated[list[Annotated[str, Field(min_length=3, max_length=200, pattern=r"\{\}")]],
                                   Field(min_length=1, max_length=64, description=(
        "Prompt templates of zero-shot classification ({} is the class name); each class's text embedding is "
        "the mean over its prompts, as in CLIP."))] = ["a photo of a {}."]
    limit: Annotated[int, Field(ge=1, le=1000, description="Top results ranked per query (the k of @k).")] = 20
    distance: Annotated[Distance, Field(description="Distance between embeddings.")] = Distance.COSINE
    every_epochs: Annotated[int, Field(ge=0, le=1000, description=(
        "Also evaluate every N epochs (0: only before and after)."))] = 0
    batch_size: Annotated[int, Field(ge=1, le=65536, description="Encoding batch size.")] = 128
    max_queries: Annotated[int | None, Field(ge=1, description="Evaluate at most this many queries.")] = None


class BestModelSpec(_Model):
    monitor: Annotated[str, Field(min_length=1, max_length=100, description=(
        "Metric to monitor: val_loss, train_loss or an evaluation metric name (e.g. recall_at_k)."))] = "val_loss"
    mode: Annotated[Mode, Field(description="Whether lower (min) or higher (max) is better.")] = Mode.MIN


class EarlyStoppingSpec(_Model):
    monitor: Annotated[str, Field(min_length=1, max_length=100, description="Metric to monitor.")] = "val_loss"
    mode: Annotated[Mode, Field(description="Whether lower (min) or higher (max) is better.")] = Mode.MIN
    patience: Annotated[int, Field(ge=1, le=1000, description="Epochs without improvement before stopping.")] = 2
    min_delta: Annotated[float, Field(ge=0.0, description="Smallest change that counts as improvement.")] = 0.0


class WiseFtSpec(_Model):
    alpha: Annotated[float, Field(ge=0.0, le=1.0, description=(
        "WiSE-FT weight: θ = (1−α)·θ_start + α·θ_finetuned, on floating tensors only. Ignored with `sweep`."))] = 0.4
    sweep: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]] | None, Field(
        min_length=2, max_length=21, description=(
            "Evaluate these α (e.g. [0, 0.25, 0.5, 0.75, 1]) on the evaluation queries (the target) and on "
            "data.reference, and build the artifact at the α the rule picks: the highest target `metric` among "
            "those keeping at least `keepReference` × the starting model's reference metric (without a reference "
            "set: the highest target metric). α = 0 is always evaluated as the baseline."))] = None
    metric: Annotated[str, Field(min_length=1, max_length=100, description=(
        "Retrieval metric the sweep's rule compares, higher is better (e.g. R@5, ndcg_at_k)."))] = "R@5"
    keep_reference: Annotated[float, Field(ge=0.0, le=1.0, description=(
        "Fraction of the starting model's reference metric the chosen α must keep."))] = 0.95


# W&B's own limits on project and entity names (no path or URL separators)
WANDB_NAME_PATTERN = r"^[^/\\#?%:]+$"
MLFLOW_URI_PATTERN = r"^(https?://[^/ ]+(/[^ ]*)?|file:[^ ]+)$"


class WandbApiKeySecret(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                               description="Name of a Secret in the run's namespace.")]
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description=(
        "Key in the Secret holding the W&B API key."))] = "WANDB_API_KEY"


class WandbSpec(_Model):
    project: Annotated[str | None, Field(max_length=128, pattern=WANDB_NAME_PATTERN, description=(
        "W&B project. Empty: kubetune."))] = None
    entity: Annotated[str | None, Field(max_length=128, pattern=WANDB_NAME_PATTERN, description=(
        "W&B entity (user or team). Empty: the API key's default entity."))] = None
    run_name: Annotated[str | None, Field(max_length=128, description=(
        "Display name of the W&B run. Empty: the FinetuneRun's name. Every attempt of a run logs to the same "
        "W&B run (its id comes from the FinetuneRun's uid)."))] = None
    mode: Annotated[Literal["auto", "online", "offline"], Field(description=(
        "auto: online when WANDB_API_KEY is set in the trainer's environment (see apiKeySecret), else offline. "
        "An offline run is copied into the run's store under tracking/wandb/ at the end, for `wandb sync`."))] = (
        "auto")
    api_key_secret: Annotated[WandbApiKeySecret | None, Field(description=(
        "Secret with the W&B API key, passed to the trainer as WANDB_API_KEY through secretKeyRef (the operator "
        "never reads it)."))] = None


MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class MlflowCredentialsSecret(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                               description=(
        "Name of a Secret in the run's namespace with the keys MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN (bearer token); each is passed to the "
        "trainer as the variable of that name through an optional secretKeyRef (the operator never reads it)."))]


class MlflowSpec(_Model):
    tracking_uri: Annotated[str, Field(min_length=1, max_length=2048, pattern=MLFLOW_URI_PATTERN, description=(
        "MLflow tracking server: an http(s) URL (e.g. http://mlflow.mlflow:5000) or a file: path. Credentials in "
        "the URL are refused."))]
    experiment: Annotated[str, Field(min_length=1, max_length=256, description=(
        "MLflow experiment, created when missing."))] = "kubetune"
    run_name: Annotated[str | None, Field(max_length=250, description=(
        "Name of the MLflow run. Empty: the FinetuneRun's name. Every attempt of a run logs to the same MLflow "
        "run (found by its kubetune.run_uid tag)."))] = None
    credentials_secret: Annotated[MlflowCredentialsSecret | None, Field(description=(
        "Credentials of a tracking server that asks for them."))] = None


class CallbacksSpec(_Model):
    evaluation: Annotated[EvaluationSpec, Field(description="Retrieval evaluation.")] = EvaluationSpec()
    best_model: Annotated[BestModelSpec | None, Field(description=(
        "Keep the best epoch's weights (by a monitored metric) as the final model."))] = None
    early_stopping: Annotated[EarlyStoppingSpec | None, Field(description="Stop when a metric stalls.")] = None
    wise_ft: Annotated[WiseFtSpec | None, Field(description="Interpolate with the starting weights.")] = None
    wandb: Annotated[WandbSpec | None, Field(description=(
        "Log params, per-step loss, validation loss, retrieval metrics and the artifact URI to Weights & Biases "
        "(rank 0 only; a tracking failure never fails the run)."))] = None
    mlflow: Annotated[MlflowSpec | None, Field(description=(
        "Log params, per-step loss, validation loss, retrieval metrics and the artifact URI to an MLflow "
        "tracking server (rank 0 only; a tracking failure never fails the run)."))] = None


class ExportSpec(_Model):
    onnx: Annotated[bool, Field(description=(
        "Also export each tower to ONNX, verified against torch with onnxruntime."))] = False


class SecretRef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                               description="Name of a Secret in the run's namespace.")]
    access_key_key: Annotated[str, Field(min_length=1, max_length=253, description=(
        "Key in the Secret holding the access key id."))] = "AWS_ACCESS_KEY_ID"
    secret_key_key: Annotated[str, Field(min_length=1, max_length=253, description=(
        "Key in the Secret holding the secret access key."))] = "AWS_SECRET_ACCESS_KEY"


class OutputSpec(_Model):
    endpoint: Annotated[str | None, Field(max_length=2048, pattern=r"^https?://[^/\s]+/?$", description=(
        "S3/MinIO endpoint URL, e.g. http://minio.minio:9000. Empty: the operator's default."))] = None
    bucket: Annotated[str | None, Field(min_length=3, max_length=63, pattern=BUCKET_PATTERN, description=(
        "Bucket for artifacts and checkpoints; empty: the operator's default."))] = None
    prefix: Annotated[str, Field(max_length=1024, description=(
        "Key prefix; the run's checkpoints and artifact go under <prefix>/<namespace>/<name>/<uid>/."))] = "kubetune"
    region: Annotated[str, Field(max_length=64, description="S3 region.")] = "us-east-1"
    credentials_secret: Annotated[SecretRef | None, Field(description=(
        "Secret with the S3 credentials, passed to the trainer through secretKeyRef (the operator never "
        "reads it). Empty: the operator's default."))] = None
    retry_seconds: Annotated[int, Field(ge=0, le=3600, description=(
        "How long the trainer retries an unreachable S3 endpoint (exponential backoff from 0.5 s, capped at "
        "15 s) before it exits with a retryable failure; 0: no retry."))] = 120


class Toleration(_Model):
    key: Annotated[str | None, Field(max_length=316, description="Taint key.")] = None
    operator: Annotated[Literal["Exists", "Equal"] | None, Field(description="Exists or Equal.")] = None
    value: Annotated[str | None, Field(max_length=63, description="Taint value.")] = None
    effect: Annotated[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
                      Field(description="Taint effect.")] = None
    toleration_seconds: Annotated[int | None, Field(description="For NoExecute: how long to stay bound.")] = None


class ResourcesSpec(_Model):
    gpus: Annotated[int, Field(ge=0, le=16, description=(
        "GPUs for the trainer pod (nvidia.com/gpu); more than one runs DDP through torchrun."))] = 1
    nodes: Annotated[int, Field(ge=1, le=64, description=(
        "Pods the run trains on, each with these resources. More than one starts them as one unit (an Indexed "
        "Job, or one Job per pod on servers before 1.22) that trains with torchrun across the pods; one failing "
        "pod fails (and retries) the whole unit."))] = 1
    procs_per_node: Annotated[int | None, Field(ge=1, le=16, description=(
        "Training processes per pod. Empty: the pod's GPUs, else 1."))] = None
    cpu: Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=20, description="CPU request and limit.")] = "4"
    memory: Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=20, description=(
        "Memory request and limit."))] = "16Gi"
    ephemeral_storage: Annotated[str | None, Field(pattern=QUANTITY_PATTERN, max_length=20, description=(
        "Local disk of the trainer (a Kubernetes quantity, e.g. 50Gi): the size limit of its scratch /tmp (data "
        "cache, checkpoints and the artifact before upload) and the container's ephemeral-storage request and "
        "limit; the kubelet evicts a pod that writes more. Empty: the operator's default (Helm value "
        "runDefaults.trainer.ephemeralStorage, 20Gi)."))] = None
    node_selector: Annotated[dict[str, str], Field(description="Node labels the trainer pod requires.")] = {}
    tolerations: Annotated[list[Toleration], Field(max_length=32, description="Taints the pod tolerates.")] = []
    priority_class_name: Annotated[str | None, Field(max_length=253, description="PriorityClass.")] = None
    image: Annotated[str | None, Field(max_length=1024, description=(
        "Trainer image. Empty: the operator's default."))] = None
    image_pull_policy: Annotated[Literal["Always", "IfNotPresent", "Never"] | None, Field(description=(
        "Image pull policy. Empty: the operator's default."))] = None
    image_pull_secrets: Annotated[list[str], Field(max_length=16, description=(
        "Names of image pull Secrets."))] = []


DEFAULT_GANG_SCHEDULING_SECONDS = 600


class RunPolicySpec(_Model):
    backoff_limit: Annotated[int, Field(ge=0, le=100, description=(
        "Retries for retryable trainer failures (each resumes from the latest checkpoint)."))] = 3
    active_deadline_seconds: Annotated[int | None, Field(ge=1, description=(
        "Fail the run when it has been active this long."))] = None
    ttl_seconds_after_finished: Annotated[int | None, Field(ge=0, description=(
        "Delete the run's Jobs (with them their run configs) this long after it finished (the run and its "
        "artifact stay)."))] = None
    suspend: Annotated[bool, Field(description=(
        "Suspend the run: its Job is deleted (checkpoints kept); unsuspend resumes from the last checkpoint."))] = False
    checkpoint_every_steps: Annotated[int, Field(ge=0, description=(
        "Write a training checkpoint every N optimizer steps (0: only at epoch ends)."))] = 0
    checkpoint_every_epochs: Annotated[int, Field(ge=0, description=(
        "Write a training checkpoint every N epochs (0: never at epoch ends)."))] = 1
    scheduling_timeout_seconds: Annotated[int | None, Field(ge=1, description=(
        "Fail the run when its pods are not all running this long after its attempt's Jobs were created (an "
        "attempt over several pods holds what it got while it waits for the rest). Empty: 600 for runs over "
        "several pods, no limit for one pod."))] = None

    def scheduling_timeout(self, nodes: int) -> int | None:
        """The scheduling timeout that applies to a run over ``nodes`` pods."""
        if self.scheduling_timeout_seconds is not None:
            return self.scheduling_timeout_seconds
        return DEFAULT_GANG_SCHEDULING_SECONDS if nodes > 1 else None


class FinetuneRunSpec(_Model):
    model: Annotated[ModelSpec, Field(description="The CLIP model to start from.")] = ModelSpec()
    data: Annotated[DataSpec, Field(description="Training and evaluation data.")]
    training: Annotated[TrainingSpec, Field(description="Optimisation settings.")] = TrainingSpec()
    callbacks: Annotated[CallbacksSpec, Field(description=(
        "Evaluation, checkpoints, early stopping, WiSE-FT, experiment tracking."))] = (
        CallbacksSpec())
    export: Annotated[ExportSpec, Field(description="Extra artifact formats.")] = ExportSpec()
    output: Annotated[OutputSpec, Field(description="Where the artifact and checkpoints go.")] = OutputSpec()
    resources: Annotated[ResourcesSpec, Field(description="Pod resources and scheduling.")] = ResourcesSpec()
    run_policy: Annotated[RunPolicySpec, Field(description="Retries, deadlines, TTL, suspend, checkpoints.")] = (
        RunPolicySpec())
    queue_name: Annotated[str | None, Field(max_length=63, pattern=DNS_LABEL, description=(
        "Kueue LocalQueue; set on the Job as the kueue.x-k8s.io/queue-name label."))] = None

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuneRunSpec:
        errors = cross_field_errors(self)
        if errors:
            raise ValueError("; ".join(f"{path}: {reason}" for path, reason in errors))
        return self


def cross_field_errors(spec: FinetuneRunSpec) -> list[tuple[str, str]]:
    """Rules an OpenAPI schema cannot express, as (field path, reason) pairs. Pure."""
    errors: list[tuple[str, str]] = []
    if spec.data.val_split > 0 and spec.data.eval:
        errors.append(("spec.data.valSplit", "set either valSplit or eval data, not both"))
    if spec.model.pretrained and spec.model.weights:
        errors.append(("spec.model.weights", "set either model.pretrained or model.weights, not both"))
    else:
        try:
            spec.model.pretrained_tag()
        except ValueError as exc:
            errors.append(("spec.model.name", str(exc)))
    if spec.training.lock_image and spec.training.lock_text:
        errors.append(("spec.training.lockText", "locking both towers leaves nothing to train"))
    if spec.data.index and not spec.data.query:
        errors.append(("spec.data.query", "an index set needs a query set"))
    monitors = [("spec.callbacks.bestModel.monitor", spec.callbacks.best_model),
                ("spec.callbacks.earlyStopping.monitor", spec.callbacks.early_stopping)]
    has_validation = bool(spec.data.eval) or spec.data.val_split > 0
    for path, callback in monitors:
        if callback is not None and callback.monitor == "val_loss" and not has_validation:
            errors.append((path, "val_loss needs eval data or valSplit > 0"))
    wise_ft = spec.callbacks.wise_ft
    if wise_ft is not None and wise_ft.sweep is not None and not (spec.data.query or has_validation):
        errors.append(("spec.callbacks.wiseFt.sweep", "the sweep needs evaluation data: query, eval or valSplit"))
    if spec.data.zero_shot and not (spec.data.query or has_validation):
        errors.append(("spec.data.zeroShot", "zero-shot accuracy is evaluated beside retrieval: it needs query, eval "
                                             "or valSplit"))
    if spec.data.reference and (wise_ft is None or wise_ft.sweep is None):
        errors.append(("spec.data.reference", "the reference set is evaluated by callbacks.wiseFt.sweep: set one"))
    if spec.output.endpoint and re.match(r"^https?://[^/]*@", spec.output.endpoint):
        errors.append(("spec.output.endpoint", "credentials must not be in the endpoint URL; use credentialsSecret"))
    mlflow = spec.callbacks.mlflow
    if mlflow is not None and re.match(r"^https?://[^/]*@", mlflow.tracking_uri):
        # the URI is logged and kept in the run's Job (its run config) and status: a password there would leak
        errors.append(("spec.callbacks.mlflow.trackingUri", "credentials must not be in the tracking URI"))
    return errors


# ---------------------------------------------------------------------------------------------- status
LOG_TAIL_LINES = 30
LOG_LINE_MAX_CHARS = 500
MAX_METRICS = 64
MESSAGE_MAX_CHARS = 1024


class Phase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CANCELLED = "Cancelled"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value})

# Cancellation request (any value; the SDK writes the UTC time): the operator deletes the run's Jobs and ends
# it ``Cancelled``. The optional ``-by`` annotation names who asked (the SDK writes the local user).
CANCEL_ANNOTATION = f"{GROUP}/cancel-requested"
CANCEL_BY_ANNOTATION = f"{GROUP}/cancel-requested-by"


class Condition(_Model):
    type: Annotated[str, Field(max_length=64, description="Condition type, e.g. Ready, Running, Failed.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str | None, Field(max_length=128, description="CamelCase reason.")] = None
    message: Annotated[str | None, Field(max_length=MESSAGE_MAX_CHARS, description="Human message.")] = None
    last_transition_time: Annotated[str | None, Field(description="RFC 3339 time of the last change.")] = None


class Progress(_Model):
    epoch: Annotated[int | None, Field(ge=0, description="Current epoch (1-based).")] = None
    epochs: Annotated[int | None, Field(ge=0, description="Total epochs.")] = None
    step: Annotated[int | None, Field(ge=0, description="Optimizer steps done.")] = None
    total_steps: Annotated[int | None, Field(ge=0, description="Optimizer steps planned.")] = None
    percent: Annotated[float | None, Field(ge=0, le=100, description="Percent done.")] = None
    samples_per_second: Annotated[float | None, Field(ge=0, description="Training throughput.")] = None
    eta_seconds: Annotated[float | None, Field(ge=0, description="Estimated seconds left.")] = None
    skipped_rows: Annotated[int | None, Field(ge=0, description=(
        "Training rows skipped so far because their image was missing or unreadable (data.skipBadRows)."))] = None
    summary: Annotated[str | None, Field(max_length=64, description=(
        "Short human summary for `kubectl get`, e.g. \"2/5 40%\" (epoch/epochs percent)."))] = None


class Metrics(_Model):
    train_loss: Annotated[float | None, Field(description="Latest training loss.")] = None
    val_loss: Annotated[float | None, Field(description="Latest validation loss.")] = None
    before: Annotated[dict[str, float], Field(max_length=MAX_METRICS, description=(
        "Retrieval metrics before fine-tuning."))] = {}
    after: Annotated[dict[str, float], Field(max_length=MAX_METRICS, description=(
        "Retrieval metrics after fine-tuning."))] = {}
    epochs: Annotated[list[dict[str, float]], Field(max_length=1000, description=(
        "Key retrieval metrics of each epoch evaluated during training (callbacks.evaluation.everyEpochs)."))] = []
    wise_ft: Annotated[dict[str, Any] | None, Field(description=(
        "The WiSE-FT sweep: metric, keepReference, the chosen alpha and the frontier (alpha, target, reference)."),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})] = None


class Artifact(_Model):
    uri: Annotated[str, Field(max_length=2048, description="Where the artifact is (s3:// URI or path).")]
    size: Annotated[int | None, Field(ge=0, description="Total bytes.")] = None
    sha256: Annotated[str | None, Field(max_length=64, description="sha256 of the artifact's manifest.")] = None


class StartedFrom(_Model):
    model: Annotated[str, Field(max_length=253, description=(
        "The open_clip model trained (a kubetune artifact in model.weights supplies its own)."))]
    pretrained: Annotated[str | None, Field(max_length=253, description=(
        "The pretrained tag whose weights it started from (a name alone means its default tag); empty for "
        "model.weights or a random init."))] = None
    source: Annotated[str | None, Field(max_length=2048, description=(
        "Where those weights came from: the model mirror, the hub or its cache, model.weights; 'random init' "
        "when none were loaded. A URL's query string is not shown."))] = None

    @property
    def ref(self) -> str:
        """``NAME::TAG`` (or the name alone when no tag was used)."""
        return self.model + (f"::{self.pretrained}" if self.pretrained else "")


class LogCursorStatus(_Model):
    pod: Annotated[str, Field(max_length=253, description="The trainer pod whose log was read.")]
    time: Annotated[str, Field(max_length=64, description=(
        "Timestamp (RFC 3339, nanoseconds) of the last log line folded into this status."))]
    lines: Annotated[int, Field(ge=0, description="Lines read that carry exactly that timestamp.")] = 0


class FinetuneRunStatus(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              use_enum_values=True)

    phase: Annotated[Phase | None, Field(description="Pending, Running, Succeeded, Failed, Suspended, Cancelled.")] = (
        None)
    conditions: Annotated[list[Condition], Field(max_length=16, description="Conditions with reasons.")] = []
    observed_generation: Annotated[int | None, Field(description="The generation last acted on.")] = None
    start_time: Annotated[str | None, Field(description="When the run started (RFC 3339).")] = None
    completion_time: Annotated[str | None, Field(description="When the run finished (RFC 3339).")] = None
    job_name: Annotated[str | None, Field(max_length=253, description="The run's Job.")] = None
    pod_name: Annotated[str | None, Field(max_length=253, description="The trainer pod being followed.")] = None
    pods: Annotated[list[str] | None, Field(max_length=64, description=(
        "The current attempt's pods by node rank, for a run over several pods (podName is node rank 0's)."))] = None
    attempts: Annotated[int | None, Field(ge=0, description="Trainer attempts so far.")] = None
    retries: Annotated[int | None, Field(ge=0, description=(
        "Retryable trainer failures so far (compared with spec.runPolicy.backoffLimit)."))] = None
    checkpoint: Annotated[str | None, Field(max_length=2048, description=(
        "Latest training checkpoint reported by the trainer; the next attempt resumes from it."))] = None
    progress: Annotated[Progress | None, Field(description="Training progress.")] = None
    metrics: Annotated[Metrics | None, Field(description="Latest losses and retrieval metrics.")] = None
    log_tail: Annotated[list[str], Field(max_length=LOG_TAIL_LINES, description=(
        "The last trainer log lines (bounded)."))] = []
    artifact: Annotated[Artifact | None, Field(description="The published artifact.")] = None
    started_from: Annotated[StartedFrom | None, Field(description=(
        "The model and weights the trainer started from, as it resolved them."))] = None
    message: Annotated[str | None, Field(max_length=MESSAGE_MAX_CHARS, description="Human summary.")] = None
    attempt_generation: Annotated[int | None, Field(ge=0, description=(
        "The spec generation the current attempt runs with (a spec edit applies from the next attempt)."))] = None
    suspended_seconds: Annotated[float | None, Field(ge=0, description=(
        "Seconds spent suspended; not counted against spec.runPolicy.activeDeadlineSeconds."))] = None
    log_cursor: Annotated[LogCursorStatus | None, Field(description=(
        "How far the trainer's log was folded into this status; a restarted operator goes on from there."))] = None
