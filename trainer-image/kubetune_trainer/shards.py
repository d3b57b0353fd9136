"""The streaming train path: WebDataset tar shards, split over ranks and loader workers, exactly resumable.

Format (what ``kubetune data shard`` writes; see the data contract): ``<prefix>/shard-000000.tar``, … with one
sample per unique image — ``<key>.jpg`` (or .jpeg/.png/.webp), ``<key>.txt`` (the first caption) and
``<key>.json`` (``{"captions": [...], "rows": [...]}``) — next to ``sizes.json`` (open_clip's samples per shard)
and ``kubetune-shards.json`` (images and pairs per shard, written last). Each sample is expanded into one pair
per caption, so an epoch is every pair once, as on the CSV path; foreign shards with only ``sizes.json`` give one
pair per sample, its caption being ``<key>.txt``.

Why WebDataset: it is open_clip's own format (``open_clip_train --dataset-type webdataset`` reads these shards),
shards are plain tar files any store serves (s3, http, local), a shard is read as a stream, so memory is
O(shuffle buffer) whatever the set's size, and a position in the stream is reached again exactly by skipping raw
samples, without decoding them. The tar reading is webdataset's (``tar_file_expander``, ``group_by_keys``,
its buffer shuffle); shards come from :meth:`Fetcher.local_path` (remote ones through its LRU disk cache) and are
opened at once.

Split: :func:`assign` deals whole shards to the ranks, largest first onto the rank with the fewest pairs, each rank
getting at least one shard per loader worker. All ranks train the same :func:`agreed_batches` per epoch (the
smallest rank's full batches), so DDP never waits on a rank that ran out. Within a rank the shards are dealt
round-robin (by index) into one *slot* per loader worker; slot ``j`` makes exactly the batches ``b ≡ j (mod W)``
of the epoch, from its own shards: shard order shuffled per (seed, epoch, rank, slot, pass), samples expanded to
pairs, shuffled in a seeded buffer of ``shuffle_buffer`` pairs (drained at the end of each pass), then cut into
batches. A slot whose shards run out before its batches do starts over on them (another pass, reshuffled); one
with more pairs than its batches need leaves its tail untrained this epoch. Images are decoded, and each pair's
augmentation run under :func:`determinism.sample_seed` of its position in the epoch, only for the batches trained.

Resume: ``set_epoch(epoch, start_batch)`` makes each slot skip the raw pairs of its batches before
``start_batch`` (bytes read, nothing decoded), so a resumed epoch yields exactly batches ``start_batch..`` of the
uninterrupted one, tensor for tensor. The DataLoader asks its workers round-robin from worker 0, so worker ``w``
serves slot ``(w + start_batch) mod W``: its first batch is ``start_batch + w`` and the loader's order is the
epoch's order. The batch sequence depends on (seed, epoch, world size, loader workers): a resume is exact with the
same world size and ``numWorkers``.
"""

from __future__ import annotations

import builtins
import collections
import io
import itertools
import json
import logging
import multiprocessing
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import torch
from braceexpand import braceexpand
from kubetune.api.shards import IMAGE_EXTENSIONS, MANIFEST, MANIFEST_VERSION, SIZES
from kubetune.storage import StoreError
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from .data import IMAGE_ERRORS, DataError, FetchUnavailable, ImageRef, open_image
from .determinism import sample_seed, seeded

log = logging.getLogger(__name__)

_MISSING_MANIFEST = f"no {MANIFEST} or {SIZES} next to the shards; `kubetune data shard` writes them"
_WARN_FIRST = 5  # bad samples named in the log per worker; the rest are only counted

Batch = tuple[torch.Tensor, torch.Tensor]


class ShardSource(Protocol):
    """What resolving needs of :class:`data.Fetcher`."""

    def read(self, uri: str) -> bytes: ...

    def list(self, prefix: str) -> builtins.list[str]: ...


class ShardReader(Protocol):
    """What streaming needs of :class:`data.Fetcher`."""

    def open(self, uri: str) -> BinaryIO: ...


@dataclass(frozen=True)
class Shard:
    uri: str
    images: int  # samples
    pairs: int  # (caption, image) pairs it expands to


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[Shard, ...]

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def pairs(self) -> int:
        return sum(s.pairs for s in self.shards)


def _split_uri(uri: str) -> tuple[str, str]:
    """(directory with its trailing /, file name); works for s3://, http(s)://, file:// and paths alike."""
    head, sep, name = uri.rpartition("/")
    return head + sep, name


def _counts(directory: str, fetcher: ShardSource) -> tuple[str, dict[str, tuple[int, int]]]:
    """(manifest name, {shard name: (images, pairs)}) from the manifest in ``directory``."""
    for name in (MANIFEST, SIZES):
        try:
            raw = fetcher.read(directory + name)
        except (FileNotFoundError, IsADirectoryError):
            continue
        where = directory + name
        try:
            doc = json.loads(raw)
            if name == SIZES:
                return name, {str(k): (int(v), int(v)) for k, v in doc.items()}
            if int(doc.get("version", 0)) != MANIFEST_VERSION:
                raise DataError("train", None, f"{where}: version {doc.get('version')!r} is not "
                                               f"{MANIFEST_VERSION} (written by another kubetune version; reshard "
                                               "with this one)")
            return name, {str(s["name"]): (int(s["images"]), int(s["pairs"])) for s in doc["shards"]}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError("train", None, f"{where} is malformed ({type(exc).__name__}: {exc})") from None
    raise DataError("train", None, f"{directory or './'}: {_MISSING_MANIFEST}")


def _listed(prefix: str, fetcher: ShardSource) -> list[str]:
    """The .tar objects directly under ``prefix`` (shards of a nested prefix belong to another set)."""
    bare = prefix.removeprefix("file://")
    out = []
    try:
        listed = fetcher.list(prefix)
    except FileNotFoundError:
        raise DataError("train", None, f"{prefix}: no such directory or bucket") from None
    for uri in listed:
        name = uri.removeprefix("file://")
        rest = name[len(bare):] if name.startswith(bare) else None
        if rest and "/" not in rest and rest.endswith(".tar"):
            out.append(prefix + rest)
    return sorted(out)


def resolve_shards(train: str, fetcher: ShardSource) -> ShardSet:
    """The shards ``train`` names — a brace pattern, one ``.tar``, or a prefix ending in ``/`` (every .tar directly
    under it) — with their sizes from the manifest next to them (:data:`MANIFEST`, else open_clip's
    :data:`SIZES`, where pairs = samples)."""
    if train.endswith("/"):
        uris = _listed(train, fetcher)
        if not uris:
            raise DataError("train", None, f"{train}: no .tar shards there")
    else:
        uris = list(dict.fromkeys(braceexpand(train)))
    manifests: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {}
    shards = []
    for uri in uris:
        directory, name = _split_uri(uri)
        if directory not in manifests:
            manifests[directory] = _counts(directory, fetcher)
        manifest, counts = manifests[directory]
        if name not in counts:
            raise DataError("train", None, f"{uri}: not in {directory}{manifest} ({len(counts)} shards listed there; "
                                           "was the set re-sharded or its manifest overwritten?)")
        images, pairs = counts[name]
        shards.append(Shard(uri, images, pairs))
    if train.endswith("/"):
        manifest, counts = manifests[train]
        absent = sorted(set(counts) - {_split_uri(u)[1] for u in uris})
        if manifest == MANIFEST and absent:  # its presence means the set was complete when written
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise DataError("train", None, f"{train}: {MANIFEST} lists {absent[0]}{more}, which is not there")
    return ShardSet(tuple(shards))


# ------------------------------------------------------------------------------------------------ split
def assign(shards: Sequence[Shard], world_size: int, num_workers: int = 1) -> list[list[Shard]]:
    """Whole shards per rank, balanced by pairs: largest first, each onto the rank with the fewest pairs so far
    (ties: fewer shards, then the lower rank), except that every rank gets at least one shard per loader worker.
    Deterministic: every rank computes the same split."""
    slots = max(1, num_workers)
    needed = world_size * slots
    if len(shards) < needed:
        raise DataError("train", None, f"{len(shards)} shards for {world_size} processes × {slots} loader workers: "
                                       f"at least {needed} are needed (each worker streams whole shards); reshard "
                                       "with a smaller `kubetune data shard --shard-size`, or lower "
                                       "training.numWorkers")
    ranks: list[list[Shard]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    order = sorted(range(len(shards)), key=lambda i: (-shards[i].pairs, i))
    for done, i in enumerate(order):
        short = [r for r in range(world_size) if len(ranks[r]) < slots]
        missing = sum(slots - len(ranks[r]) for r in short)
        candidates = short if len(order) - done <= missing else range(world_size)
        rank = min(candidates, key=lambda r: (totals[r], len(ranks[r]), r))
        ranks[rank].append(shards[i])
        totals[rank] += shards[i].pairs
    return ranks


def agreed_batches(shard_set: ShardSet, batch_size: int, world_size: int, num_workers: int = 1) -> int:
    """Full batches every rank trains per epoch: the smallest over ranks of ⌊rank pairs / batch_size⌋ (0 when a
    rank has fewer pairs than one batch), so DDP ranks never disagree on the step count.

    Per epoch a rank leaves untrained its pairs beyond that count: under one batch plus its surplus over the
    smallest rank, which largest-first dealing keeps within one shard's pairs. Pass the ``num_workers`` given to
    :func:`assign`, which can change the split.
    """
    ranks = assign(shard_set.shards, world_size, num_workers)
    return min(sum(s.pairs for s in rank) // batch_size for rank in ranks)


# ------------------------------------------------------------------------------------------------ stream
@dataclass(frozen=True)
class _RawPair:
    shard: str
    key: str
    caption: str
    image: bytes  # shared by the pairs of one sample


@dataclass(frozen=True)
class _WorkerFailure:
    """A worker's error, carried to the main process as a batch: torch re-raises worker exceptions as
    ``RuntimeError`` when their constructor takes more than a message (DataError does), which would lose the exit
    code; :class:`StreamLoader` raises it again as its own type."""

    data_error: tuple[str, int | None, str] | None = None
    other: Exception | None = None

    def error(self) -> Exception:
        if self.data_error is not None:
            return DataError(*self.data_error)
        assert self.other is not None
        return self.other


def _rng(*parts: object) -> random.Random:
    # a str seed is hashed with sha512, the same in every process whatever PYTHONHASHSEED says
    return random.Random("kubetune-shards/" + "/".join(map(str, parts)))


def _before(slot: int, start: int, slots: int) -> int:
    """How many batches b ≡ slot (mod slots) lie below ``start``."""
    return max(0, (start - slot + slots - 1) // slots)


def _consume(iterator: Iterator[Any], n: int) -> None:
    collections.deque(itertools.islice(iterator, n), maxlen=0)


class ShardStream(IterableDataset[Batch]):
    """One rank's batches of an epoch, ``(images [B,C,H,W], tokens [B,L])``, from its shards (see the module).

    Use it through :class:`StreamLoader` (a DataLoader with ``batch_size=None``). Call :meth:`set_epoch` before
    each epoch: the epoch and start batch live in shared memory (open_clip's ``SharedEpoch``), so persistent
    workers — started once, not per epoch — read them when the loader starts its next pass.

    A sample without an image member or caption, or whose image header is unreadable, is dropped (and counted)
    where it is read, before the shuffle, when ``skip_bad_rows``; one whose image data fails to decode is only met
    in a trained batch, where its place is taken by the next good pair of that batch, so that the stream — and a
    resume — stay unchanged. Without ``skip_bad_rows`` either raises :class:`DataError` naming shard and sample.
    """

    def __init__(self, shards: Sequence[Shard], batch_size: int, batches: int,
                 transform: Callable[[Image.Image], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                 seed: int, shuffle_buffer: int, fetcher: ShardReader, rank: int = 0,
                 skip_bad_rows: bool = False) -> None:
        if not shards:
            raise ValueError("a ShardStream needs at least one shard")
        self.shards = list(shards)
        self.batch_size, self.batches = batch_size, batches
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.rank = seed, rank
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.fetcher = fetcher
        self.skip_bad_rows = skip_bad_rows
        self._epoch: Any = multiprocessing.Value("q", 0)
        self._start: Any = multiprocessing.Value("q", 0)
        self._bad: Any = multiprocessing.Value("q", 0)  # bad samples met by every worker, for the caller's limit
        self._read: Any = multiprocessing.Value("q", 0)  # samples read by every worker (read-ahead included)
        self._warned = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches}")
        self._epoch.value, self._start.value = epoch, start_batch

    @property
    def bad_samples(self) -> int:
        """Bad samples met so far (``skip_bad_rows``), over all workers and epochs: each time one is read (no image or
        caption, an unreadable header), and once per trained pair of one whose image fails to decode."""
        return int(self._bad.value)

    @property
    def read_samples(self) -> int:
        """Samples read so far by every worker, read-ahead included: what :attr:`bad_samples` is a share of."""
        return int(self._read.value)

    def __len__(self) -> int:
        return max(0, self.batches - int(self._start.value))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        try:
            yield from self._batches(info.num_workers if info else 1, info.id if info else 0)
        except DataError as exc:
            if info is None:
                raise
            yield _WorkerFailure(data_error=(exc.set_name, exc.row, exc.reason))  # type: ignore[misc]
        except (FetchUnavailable, StoreError) as exc:
            if info is None:
                raise
            yield _WorkerFailure(other=exc)  # type: ignore[misc]

    def _batches(self, slots: int, worker: int) -> Iterator[Batch]:
        epoch, start = int(self._epoch.value), int(self._start.value)
        slot = (worker + start) % slots
        shards = self.shards[slot::slots]
        if not shards:
            raise DataError("train", None, f"rank {self.rank} has {len(self.shards)} shards for {slots} loader "
                                           "workers (split the shards with assign(..., num_workers))")
        skipped = _before(slot, start, slots)
        pairs = self._pairs(shards, epoch, slot, slots)
        _consume(pairs, skipped * self.batch_size)  # raw pairs: the batches before start_batch decode nothing
        for b in range(slot + skipped * slots, self.batches, slots):
            yield self._collate(list(itertools.islice(pairs, self.batch_size)), epoch, b)

    def _pairs(self, shards: Sequence[Shard], epoch: int, slot: int, slots: int) -> Iterator[_RawPair]:
        """The slot's endless stream of raw pairs: pass after pass over its shards, each pass shuffled apart (the
        buffer drains at a pass's end, so a slot holding exactly its batches' pairs trains each once)."""
        for n in itertools.count():
            order = list(shards)
            _rng("shards", self.seed, epoch, self.rank, slots, slot, n).shuffle(order)
            produced = [0]
            rng = _rng("buffer", self.seed, epoch, self.rank, slots, slot, n)
            yield from _shuffle(self._pass(order, produced), bufsize=self.shuffle_buffer,
                                initial=self.shuffle_buffer, rng=rng)
            if not produced[0]:
                raise DataError("train", None, f"{', '.join(s.uri for s in shards)}: no usable samples")

    def _pass(self, order: Sequence[Shard], produced: list[int]) -> Iterator[_RawPair]:
        for shard in order:
            for pair in self._shard_pairs(shard.uri):
                produced[0] += 1
                yield pair

    def _shard_pairs(self, uri: str) -> Iterator[_RawPair]:
        try:
            stream = self.fetcher.open(uri)
        except FileNotFoundError:
            raise DataError("train", None, f"{uri} does not exist") from None
        with stream:
            samples = group_by_keys(tar_file_expander([{"url": uri, "stream": stream}]))
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    return
                except (tarfile.TarError, ValueError, EOFError, OSError) as exc:
                    reason = str(exc.args[0] if exc.args else exc).split(" @ ")[0]
                    raise DataError("train", None, f"{uri}: not a readable tar shard ({reason})") from None
                with self._read.get_lock():
                    self._read.value += 1
                pairs = _expand(sample)
                if isinstance(pairs, str):
                    self._bad_sample(uri, str(sample.get("__key__")), pairs)
                    continue
                yield from pairs

    def _bad_sample(self, uri: str, key: str, reason: str) -> None:
        what = f"{uri}: sample {key}: {reason}"
        if not self.skip_bad_rows:
            raise DataError("train", None, what)
        with self._bad.get_lock():
            self._bad.value += 1
        if self._warned < _WARN_FIRST:
            self._warned += 1
            log.warning("train set: skipped %s%s", what, " (further ones are counted only)"
                        if self._warned == _WARN_FIRST else "")

    def _collate(self, raw: list[_RawPair], epoch: int, b: int) -> Batch:
        images: list[torch.Tensor | None] = []
        for i, pair in enumerate(raw):
            image, why = open_image(ImageRef(key=pair.key, data=pair.image))
            if image is None:
                self._bad_sample(pair.shard, pair.key, why)
                images.append(None)
                continue
            # the pair's position in this rank's epoch: the same whoever decodes it and wherever a resume started
            with seeded(sample_seed(self.seed, epoch, (self.rank * self.batches + b) * self.batch_size + i)):
                images.append(self.transform(image))
        texts = [p.caption for p in raw]
        good = [i for i, tensor in enumerate(images) if tensor is not None]
        if not good:
            raise DataError("train", None, f"{raw[0].shard}: every image of a batch is unreadable")
        for i, tensor in enumerate(images):
            if tensor is None:  # the next good pair of the batch stands in: the stream itself is unchanged
                j = next((g for g in good if g > i), good[0])
                images[i], texts[i] = images[j], texts[j]
        return torch.stack([im for im in images if im is not None]), self.tokenizer(texts)


def _expand(sample: dict[str, Any]) -> list[_RawPair] | str:
    """One pair per caption of a raw sample, or why it is unusable. The image is only identified (its header
    read), not decoded: that happens for trained batches only."""
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image is None:
        return f"no image ({', '.join(IMAGE_EXTENSIONS)})"
    captions: list[str] = []
    try:
        if "json" in sample:
            doc = json.loads(sample["json"])
            listed = doc.get("captions") if isinstance(doc, dict) else None
            if isinstance(listed, list):
                captions = [c for c in listed if isinstance(c, str) and c.strip()]
        if not captions and "txt" in sample:
            text = sample["txt"].decode("utf-8").strip()
            captions = [text] if text else []
    except (ValueError, UnicodeDecodeError) as exc:
        return f"unreadable caption ({type(exc).__name__})"
    if not captions:
        return "no caption"
    try:
        with Image.open(io.BytesIO(image)):
            pass
    except IMAGE_ERRORS as exc:
        return f"unreadable image ({type(exc).__name__})"
    return [_RawPair(str(sample["__url__"]), str(sample["__key__"]), c, image) for c in captions]


class StreamLoader:
    """A DataLoader over a :class:`ShardStream`: ``batch_size=None`` (the stream batches), persistent workers,
    in-order round-robin (which the stream's slots rely on), its own seed generator (so starting an epoch draws
    nothing from the global RNG), and worker errors raised again as their own types."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> None:
        self.stream = stream
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        self.loader: DataLoader[Batch] = DataLoader(
            stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(stream.seed), **kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if isinstance(batch, _WorkerFailure):
                raise batch.error()
            yield batch

