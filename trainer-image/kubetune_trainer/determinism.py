"""Random state that a resumed attempt must continue from, and augmentation seeded per sample.

A checkpoint saves the global RNGs (torch's CPU and CUDA generators, Python's, NumPy's) and a resume restores
them, so whatever draws from them after that point (dropout, patch dropout) draws what the uninterrupted run
drew. Training augmentation does not draw from them at all: each sample's transform runs under a seed made of
(run seed, epoch, sample index), so it is the same whatever the loader workers, the ranks, or where a resume
started the epoch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

_MASK = (1 << 63) - 1


def rng_state() -> dict[str, Any]:
    """The global RNG states, as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (splitmix64 of the three, so neighbours are unrelated)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    value = (value * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    value ^= value >> 27
    return value & _MASK


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's (CPU) and Python's RNGs seeded, leaving both as they were afterwards."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also seeds every accelerator backend, and where none is
        # initialised (a loader worker) each call queues a formatted stack trace that is never released
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
