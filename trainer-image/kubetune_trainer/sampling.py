"""Torch datasets and a resumable, rank-aware batch sampler.

The batch order of an epoch is a pure function of (seed, epoch, rank, world size), so a restarted trainer
skips exactly the batches it had already trained on (``start_batch``) without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import Pair
from .determinism import sample_seed, seeded


class PairDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image tensor, token ids) per pair. Texts are tokenized once up front, not per step.

    A key ``(epoch, index)`` (what :class:`EpochBatchSampler` yields with ``with_epoch``) runs the transform
    under a seed of its own (see :mod:`determinism`); a plain index runs it on the global RNG.
    """

    def __init__(self, pairs: Sequence[Pair], transform: Callable[[Any], torch.Tensor], tokens: torch.Tensor,
                 seed: int = 0):
        if len(pairs) != tokens.shape[0]:
            raise ValueError("one token row per pair is needed")
        self.pairs = list(pairs)
        self.transform = transform
        self.tokens = tokens
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            epoch, index = key
            image = self.pairs[index].image.open()
            with seeded(sample_seed(self.seed, epoch, index)):
                return self.transform(image), self.tokens[index]
        return self.transform(self.pairs[key].image.open()), self.tokens[key]


class ImageDataset(Dataset[torch.Tensor]):
    def __init__(self, images: Sequence[Any], transform: Callable[[Any], torch.Tensor]):
        self.images = list(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index].open())


def tokenize(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str], chunk: int = 4096) -> torch.Tensor:
    parts = [tokenizer(list(texts[i:i + chunk])) for i in range(0, len(texts), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank sees per epoch (the last partial batch is dropped, as open_clip does)."""
    return n // (batch_size * world_size)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """The batches (index lists) rank ``rank`` trains on in ``epoch``; deterministic."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_rank = batches_per_epoch(n, batch_size, world_size) * batch_size
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


class EpochBatchSampler(Sampler[list[Any]]):
    """Yields one epoch's batches from ``start_batch`` on; call :meth:`set_epoch` before each epoch.

    With ``with_epoch`` each item is ``(epoch, index)``, so the dataset can seed that sample's augmentation.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 with_epoch: bool = False) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start_batch

    def __iter__(self) -> Iterator[list[Any]]:
        batches = epoch_batches(self.n, self.batch_size, self.seed, self.epoch, self.rank, self.world_size)
        for batch in batches[self.start_batch:]:
            yield [(self.epoch, i) for i in batch] if self.with_epoch else batch


def make_loader(dataset: Dataset[Any], num_workers: int, pin_memory: bool,
                batch_sampler: Sampler[list[Any]] | None = None, batch_size: int | None = None,
                generator: torch.Generator | None = None) -> DataLoader[Any]:
    """A DataLoader with persistent workers (no per-epoch worker start-up, unlike open_clip's).

    ``generator`` draws the loader's base seed, which otherwise comes from (and advances) the global RNG.
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory, "generator": generator}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
