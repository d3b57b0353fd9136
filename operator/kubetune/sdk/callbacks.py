"""Finetuner-style callbacks for :func:`kubetune.fit`; each one fills a part of ``spec.callbacks``.

    from kubetune.callback import EvaluationCallback, WiSEFTCallback, WandBLogger

    kubetune.fit(..., callbacks=[EvaluationCallback(query_data=queries, index_data=index, model="clip-text",
                                                    index_model="clip-vision"),
                                 WiSEFTCallback(alpha=0.5), EarlyStopping(monitor="val_loss", patience=2),
                                 BestModelCheckpoint(), WandBLogger(project="shoes")])

Finetuner's arguments are accepted under their names; the few kubetune cannot honour (a text→text evaluation,
``gather_examples``, an early-stopping ``baseline``, a W&B key in plain text) are refused when the callback is
made, with a :class:`~kubetune.api.errors.ConfigInvalid` saying what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.api.errors import ConfigInvalid

TEXT_MODEL = "clip-text"
IMAGE_MODEL = "clip-vision"
WANDB_KEY = "WANDB_API_KEY"


def _section(spec: dict[str, Any]) -> dict[str, Any]:
    callbacks: dict[str, Any] = spec.setdefault("callbacks", {})
    return callbacks


def resolve_mode(monitor: str, mode: str) -> str:
    """Finetuner's ``mode='auto'``: lower is better for losses and ranks, higher for every retrieval score."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ConfigInvalid(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    return "min" if monitor.endswith(("loss", "mean_rank", "median_rank")) else "max"


@dataclass
class EvaluationCallback:
    """Text → image retrieval evaluation before and after training, and every ``every_epochs`` epochs.

    ``query_data``/``index_data`` are data sets like ``train_data`` (default: the eval data); Finetuner's
    labelled shape (text queries and image index documents sharing ``tags['finetuner_label']``) works too.
    ``model``/``index_model`` are Finetuner's tower names: kubetune encodes queries with clip-text and the index
    with clip-vision, so only that pair (or neither) is accepted. ``exclude_self`` has no effect (a text query
    never meets itself in an image index).
    """

    query_data: Any = None
    index_data: Any = None
    model: str | None = None
    index_model: str | None = None
    batch_size: int = 128
    exclude_self: bool = True
    limit: int = 20
    distance: Literal["cosine", "euclidean", "sqeuclidean"] = "cosine"
    gather_examples: bool = False
    every_epochs: int = 0
    max_queries: int | None = None

    def __post_init__(self) -> None:
        if (self.model, self.index_model) not in ((None, None), (TEXT_MODEL, IMAGE_MODEL)):
            raise ConfigInvalid(
                f"EvaluationCallback(model={self.model!r}, index_model={self.index_model!r}): kubetune evaluates "
                "text → image retrieval (text queries encoded by clip-text, an image index by clip-vision)",
                "write model='clip-text', index_model='clip-vision', or leave both out")
        if self.gather_examples:
            raise ConfigInvalid("EvaluationCallback(gather_examples=True): kubetune keeps no example results "
                                "in the run", "kubetune.write_report(artifact, 'report.html') shows the top "
                                "results of sample queries before and after fine-tuning")

    def apply(self, spec: dict[str, Any]) -> None:
        _section(spec)["evaluation"] = {
            "enabled": True, "limit": self.limit, "distance": self.distance, "everyEpochs": self.every_epochs,
            "batchSize": self.batch_size, **({"maxQueries": self.max_queries} if self.max_queries else {})}


@dataclass
class WiSEFTCallback:
    """WiSE-FT: θ = (1 − α)·θ_start + α·θ_finetuned after training (α = 0: the start model, 1: fine-tuned)."""

    alpha: float = 0.4

    def apply(self, spec: dict[str, Any]) -> None:
        _section(spec)["wiseFt"] = {"alpha": self.alpha}


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode='auto'`` (Finetuner's default): 'min' for losses and ranks, 'max' for retrieval scores.
    """

    monitor: str = "val_loss"
    mode: Literal["min", "max", "auto"] = "auto"
    patience: int = 2
    min_delta: float = 0.0
    baseline: float | None = None
    verbose: bool = False  # kubetune always logs the monitored value; kept for Finetuner's call shape

    def __post_init__(self) -> None:
        if self.baseline is not None:
            raise ConfigInvalid("EarlyStopping(baseline=...) is not supported: kubetune compares each epoch with "
                                "the best one so far", "drop baseline; tune patience and min_delta instead")
        self.mode = resolve_mode(self.monitor, self.mode)  # type: ignore[assignment]

    def apply(self, spec: dict[str, Any]) -> None:
        _section(spec)["earlyStopping"] = {
            "monitor": self.monitor, "mode": self.mode, "patience": self.patience, "minDelta": self.min_delta}


@dataclass
class BestModelCheckpoint:
    """Keep the best epoch's weights (by ``monitor``) as the final model; ``mode='auto'`` as in EarlyStopping."""

    monitor: str = "val_loss"
    mode: Literal["min", "max", "auto"] = "auto"
    verbose: bool = False

    def __post_init__(self) -> None:
        self.mode = resolve_mode(self.monitor, self.mode)  # type: ignore[assignment]

    def apply(self, spec: dict[str, Any]) -> None:
        _section(spec)["bestModel"] = {"monitor": self.monitor, "mode": self.mode}


@dataclass
class WandBLogger:
    """Log losses and evaluation metrics to Weights & Biases from the trainer.

    ``mode='auto'``: online when the trainer has ``WANDB_API_KEY`` (from ``api_key_secret``: a Secret's name, or
    ``{"name": ..., "key": ...}``, key ``WANDB_API_KEY`` by default), else offline (the offline run is copied to the
    run's store under ``tracking/wandb/``, for ``wandb sync``). Finetuner's anonymous mode has no equivalent: a
    key never goes into the run's spec.
    """

    project: str | None = None
    entity: str | None = None
    mode: Literal["auto", "online", "offline"] = "auto"
    api_key_secret: str | dict[str, str] | None = None
    run_name: str | None = None
    # Finetuner's older arguments: `experiment` was the W&B project; the other two are refused with a hint
    experiment: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    wandb_args: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api_key is not None:
            raise ConfigInvalid("WandBLogger(api_key=...): a key in plain text would be stored in the run's spec",
                                "put it in a Secret (kubectl create secret generic wandb "
                                "--from-literal=WANDB_API_KEY=...) and pass api_key_secret='wandb'")
        if self.wandb_args:
            raise ConfigInvalid("WandBLogger(wandb_args=...) is not supported",
                                "use project=, entity=, run_name= and mode=")
        if self.mode not in ("auto", "online", "offline"):
            raise ConfigInvalid(f"WandBLogger(mode={self.mode!r}): expected 'auto', 'online' or 'offline'")
        if self.experiment is not None and self.project is None:
            self.project = self.experiment
        self._secret()  # refuse a malformed secret reference now, not at fit()

    def _secret(self) -> dict[str, str] | None:
        ref = self.api_key_secret
        if ref is None:
            return None
        if isinstance(ref, str) and ref:
            return {"name": ref, "key": WANDB_KEY}
        if isinstance(ref, dict) and isinstance(ref.get("name"), str) and set(ref) <= {"name", "key"}:
            return {"name": ref["name"], "key": str(ref.get("key") or WANDB_KEY)}
        raise ConfigInvalid(f"WandBLogger(api_key_secret={ref!r}): expected a Secret name or "
                            "{'name': ..., 'key': ...}", f"the key defaults to {WANDB_KEY}")

    def apply(self, spec: dict[str, Any]) -> None:
        body: dict[str, Any] = {"mode": self.mode}
        for key, value in (("project", self.project), ("entity", self.entity), ("runName", self.run_name),
                           ("apiKeySecret", self._secret())):
            if value is not None:
                body[key] = value
        _section(spec)["wandb"] = body


@dataclass
class MLflowLogger:
    """Log parameters, losses and evaluation metrics to an MLflow tracking server from the trainer."""

    tracking_uri: str
    experiment: str = "kubetune"
    run_name: str | None = None
    credentials_secret: str | None = None  # a Secret with MLFLOW_TRACKING_USERNAME/_PASSWORD or _TOKEN

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise ConfigInvalid("MLflowLogger: tracking_uri is required", "e.g. http://mlflow.mlflow:5000")

    def apply(self, spec: dict[str, Any]) -> None:
        _section(spec)["mlflow"] = {
            "trackingUri": self.tracking_uri, "experiment": self.experiment,
            **({"runName": self.run_name} if self.run_name else {}),
            **({"credentialsSecret": {"name": self.credentials_secret}} if self.credentials_secret else {})}


def MLFlowLogger(*, tracking_uri: str, experiment: str = "kubetune", run_name: str | None = None,
                 credentials_secret: str | None = None) -> MLflowLogger:
    """Finetuner's spelling of :class:`MLflowLogger`. Keyword arguments only: Finetuner's positional order
    (experiment, tracking_uri) is not kubetune's."""
    return MLflowLogger(tracking_uri, experiment, run_name, credentials_secret)


Callback = (EvaluationCallback | WiSEFTCallback | EarlyStopping | BestModelCheckpoint | WandBLogger | MLflowLogger)
CALLBACKS: tuple[type, ...] = (EvaluationCallback, WiSEFTCallback, EarlyStopping, BestModelCheckpoint, WandBLogger,
                               MLflowLogger)
