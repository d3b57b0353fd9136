"""Torch datasets and a resumable, rank-aware batch sampler.

The batch order of an epoch is a pure function of (seed, epoch, rank, world size), so a restarted trainer
skips exactly the batches it had already trained on (``start_batch``) without loading them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import REMOTE_SCHEMES, ImageRef, Pair, open_image
from .determinism import sample_seed, seeded

#: one sample as a loader yields it: the image tensor, its text's token ids, and the 1-based row of a pair found
#: broken while building it (0: none) with the reason; a broken pair is replaced by the next usable one, so every
#: batch, and every rank's step count, keeps its size.
Sample = tuple[torch.Tensor, torch.Tensor, int, str]
NEIGHBOURS, SPREAD = 16, 32
PREFETCH_THREADS = 8
#: the reason's prefix when no stand-in was found: the loop fails the run even under skipBadRows
UNUSABLE = "no usable image near it either: "


class PairDataset(Dataset[Sample]):
    """One :data:`Sample` per pair, its text tokenized when it is read (in the loader workers, beside the image).

    A key ``(epoch, index)`` (what :class:`EpochBatchSampler` yields with ``with_epoch``) runs the transform
    under a seed of its own (see :mod:`determinism`); a plain index runs it on the global RNG.
    """

    def __init__(self, pairs: Sequence[Pair], transform: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], seed: int = 0):
        self.pairs = pairs
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[Sample]:
        """A batch's samples; its remote images are fetched into the disk cache first, several at a time (what
        one image at a time would spend waiting on the store's latency)."""
        refs = {ref.uri: ref for key in keys
                if (ref := self.pairs[key[1] if isinstance(key, tuple) else key].image).fetcher is not None
                and ref.uri is not None and ref.decoded is None and ref.uri.startswith(REMOTE_SCHEMES)}
        if len(refs) > 1:
            with ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, len(refs))) as pool:
                # a failed fetch is left to __getitem__, which names the row (or raises an outage)
                list(pool.map(_prefetch, refs.values()))
        return [self[key] for key in keys]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        bad_row, reason = 0, ""
        for candidate in replacements(index, len(self.pairs)):
            pair = self.pairs[candidate]
            image, why = open_image(pair.image)
            if image is not None:
                break
            if not bad_row:
                bad_row, reason = pair.row, why
        else:  # nothing usable anywhere near: the loop fails the run on the flagged row (counting cannot help)
            return blank(self.transform), self.tokenizer([self.pairs[index].text])[0], bad_row, UNUSABLE + reason
        tokens = self.tokenizer([pair.text])[0]
        if epoch is None:
            return self.transform(image), tokens, bad_row, reason
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.transform(image), tokens, bad_row, reason


def _prefetch(ref: ImageRef) -> None:
    assert ref.fetcher is not None and ref.uri is not None
    with contextlib.suppress(Exception):
        ref.fetcher.local_path(ref.uri)


def blank(transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """A zero tensor of the shape ``transform`` gives: the place of an image that could not be used."""
    return torch.zeros_like(transform(Image.new("RGB", (8, 8))))


def replacements(index: int, n: int) -> Iterator[int]:
    """Where a pair's stand-in is looked for: the pair, its next neighbours (a broken image's other captions
    usually follow it), then pairs spread over the whole set (a broken run of rows longer than the window)."""
    yield from ((index + offset) % n for offset in range(min(n, NEIGHBOURS)))
    spread = random.Random(index)
    yield from (spread.randrange(n) for _ in range(SPREAD))


class ImageDataset(Dataset[tuple[torch.Tensor, str]]):
    """(image tensor, why it is unusable) per image; an unusable one is a zero tensor the caller refuses."""

    def __init__(self, images: Sequence[ImageRef], transform: Callable[[Any], torch.Tensor]):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, why = open_image(self.images[index])
        if image is None:
            return blank(self.transform), why
        return self.transform(image), ""


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
                 with_epoch: bool = False, batches: int | None = None) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.with_epoch = with_epoch
        # at most this many of the epoch's batches (those that make whole optimizer steps)
        self.batches = min(batches_per_epoch(n, batch_size, world_size), batches if batches is not None else n)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches - self.start_batch

    def __iter__(self) -> Iterator[list[Any]]:
        batches = epoch_batches(self.n, self.batch_size, self.seed, self.epoch, self.rank, self.world_size)
        for batch in batches[self.start_batch:self.batches]:
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
