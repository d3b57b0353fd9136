"""Finetuner-style callbacks for :func:`kubetune.fit`; each one fills a part of ``spec.callbacks``.

    kubetune.fit(..., callbacks=[EvaluationCallback(limit=10), WiSEFTCallback(alpha=0.5),
                                 EarlyStopping(monitor="val_loss", patience=2), BestModelCheckpoint()])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class EvaluationCallback:
    """Retrieval evaluation (text → image) before and after training, and every ``every_epochs`` epochs.

    ``query_data``/``index_data`` are data sets like ``train_data`` (default: the eval data).
    """

    query_data: Any = None
    index_data: Any = None
    limit: int = 20
    distance: Literal["cosine", "euclidean", "sqeuclidean"] = "cosine"
    every_epochs: int = 0
    batch_size: int = 128
    max_queries: int | None = None

    def apply(self, spec: dict[str, Any]) -> None:
        spec.setdefault("callbacks", {})["evaluation"] = {
            "enabled": True, "limit": self.limit, "distance": self.distance, "everyEpochs": self.every_epochs,
            "batchSize": self.batch_size, **({"maxQueries": self.max_queries} if self.max_queries else {})}


@dataclass
class WiSEFTCallback:
    """WiSE-FT: θ = (1 − α)·θ_start + α·θ_finetuned after training (α = 0: the start model, 1: fine-tuned)."""

    alpha: float = 0.4

    def apply(self, spec: dict[str, Any]) -> None:
        spec.setdefault("callbacks", {})["wiseFt"] = {"alpha": self.alpha}


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 2
    min_delta: float = 0.0

    def apply(self, spec: dict[str, Any]) -> None:
        spec.setdefault("callbacks", {})["earlyStopping"] = {
            "monitor": self.monitor, "mode": self.mode, "patience": self.patience, "minDelta": self.min_delta}


@dataclass
class BestModelCheckpoint:
    """Keep the best epoch's weights (by ``monitor``) as the final model."""

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"

    def apply(self, spec: dict[str, Any]) -> None:
        spec.setdefault("callbacks", {})["bestModel"] = {"monitor": self.monitor, "mode": self.mode}


Callback = EvaluationCallback | WiSEFTCallback | EarlyStopping | BestModelCheckpoint
