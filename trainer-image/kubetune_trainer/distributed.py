"""DDP through torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPUs.

Two limits on waiting for the other ranks: the process group's collective timeout (``training.
collectiveTimeoutSeconds``), which bounds every collective of a training step and so catches a hung rank, and
the longer limit of :class:`SoloPhases`, for the phases only rank 0 works in (evaluation, validation, checkpoint
upload, export). The other ranks wait for those in a barrier of a separate gloo group with its own timeout, so a
long evaluation never trips the step collectives' timeout and the step timeout need not be sized to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(info: DistInfo, want_gpu: bool) -> torch.device:
    if want_gpu and torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


T = TypeVar("T")
SOLO_PHASE_BASE_SECONDS = 1800.0
SOLO_PHASE_SECONDS_PER_ITEM = 0.1


def init(info: DistInfo, device: torch.device, timeout_seconds: float | None = None) -> None:
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_seconds) if timeout_seconds else None)


def solo_phase_seconds(collective_seconds: float, storage_retry_seconds: float, eval_items: int) -> float:
    """How long the other ranks wait for one of rank 0's phases: the storage retry window (a checkpoint upload
    may ride out an outage that long) plus evaluation time at a slow 10 items/s, on top of 30 minutes."""
    return max(float(collective_seconds),
               SOLO_PHASE_BASE_SECONDS + storage_retry_seconds + SOLO_PHASE_SECONDS_PER_ITEM * eval_items)


@dataclass
class SoloPhases:
    """Runs work on rank 0 alone while the other ranks wait for it in a barrier with its own timeout."""

    info: DistInfo
    group: Any = None  # None: the default group (a single process never waits)

    @classmethod
    def create(cls, info: DistInfo, timeout_seconds: float) -> SoloPhases:
        """Collective: every rank calls it, after :func:`init`."""
        group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
                 if info.distributed else None)
        return cls(info, group)

    def run(self, work: Callable[[], T]) -> T | None:
        """``work()`` on rank 0 (its result), ``None`` on the others, which return once rank 0 is done. A failure
        on rank 0 ends its process; torchrun then stops the waiting ranks."""
        result = work() if self.info.is_main else None
        if self.info.distributed:
            dist.barrier(group=self.group)
        return result


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (stop requests, early stopping, bad data)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
