"""Training callbacks as small pure pieces: monitored-metric tracking (best model, early stopping) and WiSE-FT."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (lower is better for mode 'min')."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass
class Monitor:
    """Tracks one metric across epochs; its state goes into training checkpoints."""

    metric: str
    mode: str
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def update(self, metrics: Mapping[str, float], epoch: int) -> bool | None:
        """True when this epoch is the best so far, False when not, None when the metric is absent."""
        value = metrics.get(self.metric)
        if value is None:
            return None
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class EarlyStopping:
    monitor: Monitor
    patience: int
    stopped_epoch: int | None = field(default=None)

    def should_stop(self) -> bool:
        return self.monitor.bad_epochs >= self.patience


def wise_ft(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
            alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT weight-space ensemble: θ = (1−α)·θ_start + α·θ_finetuned for floating tensors.

    Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken from the fine-tuned model.
    Both state dicts must have the same keys and shapes; α ∈ [0, 1].
    """
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    if set(start) != set(finetuned):
        diff = sorted(set(start) ^ set(finetuned))
        raise ValueError(f"WiSE-FT needs the same keys in both models; differing: {diff[:5]}")
    out = {}
    for key, tuned in finetuned.items():
        base = start[key]
        if base.shape != tuned.shape:
            raise ValueError(f"WiSE-FT: shape of {key} differs: {tuple(base.shape)} vs {tuple(tuned.shape)}")
        if tuned.is_floating_point():
            mixed = (1.0 - alpha) * base.to(device=tuned.device, dtype=torch.float32) + alpha * tuned.float()
            out[key] = mixed.to(tuned.dtype)
        else:
            out[key] = tuned.clone()
    return out


@dataclass(frozen=True)
class SweepPoint:
    """One α of a WiSE-FT sweep: the rule's metric on the target queries and on the reference set."""

    alpha: float
    target: float
    reference: float | None = None
    zero_shot: float | None = None  # top-1 zero-shot accuracy, when a labelled set is given (not part of the rule)


def choose_alpha(points: list[SweepPoint], keep_reference: float) -> SweepPoint:
    """The α a WiSE-FT sweep keeps. Pure.

    ``points`` must include α = 0, the starting model. With reference figures: the highest target among the
    points whose reference is at least ``keep_reference`` × α = 0's (α = 0 itself always qualifies); without:
    the highest target. Ties go to the smaller α, closer to the starting model.
    """
    start = next((p for p in points if p.alpha == 0.0), None)
    if start is None:
        raise ValueError("a WiSE-FT sweep needs the starting model (alpha 0) among its points")
    kept = points
    if start.reference is not None:
        floor = keep_reference * start.reference
        kept = [p for p in points if p.reference is not None and p.reference >= floor - 1e-12]
    return max(kept, key=lambda p: (p.target, -p.alpha))
