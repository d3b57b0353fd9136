"""Training checkpoints in the run's store, and resume from the latest one.

Store keys (relative to the run)::

    checkpoints/step-00000120.pt   model + optimizer + scaler + loop state (torch.save, loaded weights_only)
    checkpoints/latest.json        {"key": "checkpoints/step-00000120.pt", "step": 120, "epoch": 3, ...}
    checkpoints/best.pt            the best epoch's model weights (best-model callback)

``latest.json`` is written after the checkpoint file, so it never points at a partial upload; the oldest
checkpoints beyond ``keep`` are deleted afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from kubetune.storage import Store

LATEST = "checkpoints/latest.json"
BEST = "checkpoints/best.pt"


def checkpoint_key(step: int) -> str:
    return f"checkpoints/step-{step:08d}.pt"


def save(store: Store, work_dir: Path, state: dict[str, Any], step: int, epoch: int, keep: int = 2,
         extra: dict[str, Any] | None = None) -> str:
    """Upload ``state`` as the checkpoint for ``step``; returns its URI."""
    key = checkpoint_key(step)
    local = work_dir / "checkpoint-upload.pt"
    local.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, local)
    try:
        store.put_file(key, local)
    finally:
        local.unlink(missing_ok=True)
    store.put_bytes(LATEST, json.dumps({"key": key, "step": step, "epoch": epoch, **(extra or {})}).encode())
    old = sorted(k for k in store.list("checkpoints") if k.startswith("checkpoints/step-") and k != key)
    for stale in old[:max(0, len(old) - (keep - 1))]:
        store.delete(stale)
    return store.uri(key)


def latest_info(store: Store) -> dict[str, Any] | None:
    if not store.exists(LATEST):
        return None
    info = json.loads(store.get_bytes(LATEST))
    return info if isinstance(info, dict) else None


def mark_finished(store: Store, extra: dict[str, Any]) -> None:
    info = latest_info(store) or {}
    info.update(extra, finished=True)
    store.put_bytes(LATEST, json.dumps(info).encode())


def load_latest(store: Store, work_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(info, state) of the latest checkpoint, or None when the run has none."""
    info = latest_info(store)
    if info is None or "key" not in info:
        return None
    local = work_dir / "checkpoint-download.pt"
    store.get_file(str(info["key"]), local)
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    finally:
        local.unlink(missing_ok=True)
    return info, state


def save_weights(store: Store, work_dir: Path, key: str, weights: dict[str, torch.Tensor]) -> None:
    local = work_dir / f"upload-{os.getpid()}.pt"
    torch.save(weights, local)
    try:
        store.put_file(key, local)
    finally:
        local.unlink(missing_ok=True)


def load_weights(store: Store, work_dir: Path, key: str) -> dict[str, torch.Tensor]:
    local = work_dir / f"download-{os.getpid()}.pt"
    store.get_file(key, local)
    try:
        weights: dict[str, torch.Tensor] = torch.load(local, map_location="cpu", weights_only=True)
    finally:
        local.unlink(missing_ok=True)
    return weights
