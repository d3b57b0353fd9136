"""Check a set of (caption, image) pairs before training on it, and write it as WebDataset shards.

    kubetune data validate train.csv                      # every image fetched and decoded, then a summary
    kubetune data shard train.csv s3://bucket/shards/     # tar shards the trainer streams (data.train: that prefix)

A set is a CSV (a caption column and an image column) or a docarray DocList, at a local path, ``s3://`` or
http(s); it is read with the trainer's own readers (:mod:`kubetune_trainer.data`), so both tools see the rows as
a run does, and they need the ``trainer`` extra. A row is *broken* when its image is missing or does not decode
fully, or its caption is empty: a run fails on it (or skips it with ``data.skipBadRows``). Duplicate images (the
same bytes under different URIs) and captions longer than CLIP's 77 tokens are warnings only.

The shard layout is the one the trainer streams: ``shard-000000.tar`` … with one sample per unique
image (``<key>.jpg``, ``<key>.txt`` its first caption, ``<key>.json`` every caption and source row), then
``sizes.json`` and, last, ``kubetune-shards.json``, whose presence says the set is complete. The same input gives
byte-identical shards. Images are fetched in parallel but written in the order their first row has, and no more
than one shard's worth of image bytes is held in memory: each tar is built in a temporary file, then uploaded.

The statistics (:func:`summarise`) and the shard layout (:func:`plan_samples`, :func:`sample_members`,
:func:`manifests`) are pure functions; :func:`validate_set` and :func:`write_shards` do the I/O around them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import statistics
import tarfile
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kubetune.api.errors import ConfigInvalid, KubetuneError, MissingExtra, StorageUnavailable
from kubetune.api.shards import MANIFEST, MANIFEST_VERSION, SHARD_NAME, SHARD_PATTERN, SIZES
from kubetune.api.spec import DataSpec

if TYPE_CHECKING:
    from kubetune_trainer.data import Fetcher

    from kubetune.storage import Store

log = logging.getLogger("kubetune.sdk")
T = TypeVar("T")
R = TypeVar("R")

CONTEXT_LENGTH = 77  # CLIP's text context: longer captions are truncated by the tokenizer
MAX_PROBLEMS = 10
JPEG_QUALITY = 95
# An interactive tool: an unreachable S3 or web server is given up on after this long, not the trainer's 2 min.
FETCH_RETRY_SECONDS = 15
REMOTE = ("s3://", "http://", "https://")
# One number a progress display needs: (images done, images in all).
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class SourceRow:
    """One row of a set. ``image`` identifies its image: the resolved URI, or ``sha256:<hex>`` of the bytes a
    DocList holds inline (then in ``data``); None when the row names none."""

    row: int  # 1-based data row (CSV: line number minus the header), as the trainer counts
    caption: str
    image: str | None
    data: bytes | None = None
    error: str | None = None  # the row could not be read (a DocList tensor that is no image)


@dataclass(frozen=True)
class Problem:
    """Why one row is broken."""

    row: int
    reason: str


@dataclass(frozen=True)
class ImageCheck:
    """What fetching and fully decoding one image gave: ``problem`` None when it decoded."""

    image: str
    problem: str | None = None  # "missing" | "unreadable"
    detail: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""  # PIL's name: JPEG, PNG, WEBP, ...


@dataclass(frozen=True)
class Spread:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        return cls(min(values), statistics.median(values), max(values)) if values else None

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "median": self.median, "max": self.max}


@dataclass(frozen=True)
class DataReport:
    """A set's summary. ``ok`` when no row is broken; ``problems`` are the first :data:`MAX_PROBLEMS` broken rows,
    in row order; ``warnings`` say what a run survives but may not want (duplicates, long captions)."""

    source: str
    rows: int
    images: int  # distinct image references
    captions_per_image: Spread | None
    caption_chars: Spread | None
    caption_tokens: Spread | None  # None: not counted (open_clip not installed, or not asked)
    long_captions: int | None  # captions over CONTEXT_LENGTH tokens
    missing_images: int
    unreadable_images: int
    empty_captions: int
    duplicate_images: int  # image references whose bytes an earlier reference has already
    image_sizes: dict[str, tuple[int, int]]  # min, median, max by pixel count: (width, height)
    broken_rows: int
    problems: list[Problem]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken_rows == 0

    def to_dict(self) -> dict[str, Any]:
        def spread(s: Spread | None) -> dict[str, float] | None:
            return s.to_dict() if s else None

        return {"source": self.source, "ok": self.ok, "rows": self.rows, "images": self.images,
                "captionsPerImage": spread(self.captions_per_image), "captionChars": spread(self.caption_chars),
                "captionTokens": spread(self.caption_tokens), "longCaptions": self.long_captions,
                "missingImages": self.missing_images, "unreadableImages": self.unreadable_images,
                "emptyCaptions": self.empty_captions, "duplicateImages": self.duplicate_images,
                "imageSizes": {k: f"{w}x{h}" for k, (w, h) in self.image_sizes.items()},
                "brokenRows": self.broken_rows,
                "problems": [{"row": p.row, "reason": p.reason} for p in self.problems],
                "warnings": self.warnings}

    def first_problems(self, n: int = 3) -> str:
        return "; ".join(f"row {p.row}: {p.reason}" for p in self.problems[:n])


@dataclass(frozen=True)
class Sample:
    """One unique image of a set and every (good) row that pairs a caption with it."""

    image: str
    data: bytes | None
    captions: tuple[str, ...]
    rows: tuple[int, ...]


@dataclass(frozen=True)
class ShardInfo:
    name: str
    images: int
    pairs: int


@dataclass(frozen=True)
class ShardResult:
    source: str
    dest: str  # the prefix, ending in '/': the value of data.train
    shards: list[ShardInfo]
    images: int
    pairs: int
    skipped_rows: int
    problems: list[Problem]  # the first skipped rows and why


# ------------------------------------------------------------------------------------------------ pure
def row_problem(row: SourceRow) -> str | None:
    """Why a row is broken before its image is even fetched."""
    if row.error is not None:
        return row.error
    if not row.caption.strip():
        return "empty caption"
    if row.image is None:
        return "no image"
    return None


def image_problem(check: ImageCheck) -> str:
    where = check.image if not check.image.startswith("sha256:") else "bytes"
    if check.problem == "missing":
        return f"image {where} not found" + (f" ({check.detail})" if check.detail else "")
    return f"image {where} is unreadable ({check.detail})"


def summarise(source: str, rows: Sequence[SourceRow], checks: Mapping[str, ImageCheck],
              token_counts: Sequence[int] | None = None) -> DataReport:
    """The report of a set from its rows and what fetching its images gave. ``token_counts``: the CLIP token
    count of each non-empty caption, in row order (None: not counted). Images without a check (not fetched) are
    taken as fine."""
    problems: list[Problem] = []
    empty = no_image = 0
    for r in rows:
        reason = row_problem(r)
        if reason is None and r.image is not None and r.image in checks and checks[r.image].problem:
            reason = image_problem(checks[r.image])
        if reason is not None:
            problems.append(Problem(r.row, reason))
        empty += not r.caption.strip() and r.error is None
        no_image += r.image is None and r.error is None
    per_image = Counter(r.image for r in rows if r.image is not None)
    done = [c for c in checks.values() if c.problem is None]
    first_of: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for image in per_image:  # in order of first appearance: the later reference is the duplicate
        check = checks.get(image)
        if check is None or check.problem is not None:
            continue
        if check.sha256 in first_of:
            duplicates.append((image, first_of[check.sha256]))
        else:
            first_of[check.sha256] = image
    by_area = sorted(((c.width, c.height) for c in done), key=lambda wh: (wh[0] * wh[1], wh))
    sizes = {"min": by_area[0], "median": by_area[(len(by_area) - 1) // 2], "max": by_area[-1]} if by_area else {}
    captions = [r.caption for r in rows if r.caption.strip()]
    long_captions = sum(n > CONTEXT_LENGTH for n in token_counts) if token_counts is not None else None
    warnings = []
    if duplicates:
        image, earlier = duplicates[0]
        warnings.append(f"{len(duplicates)} image(s) have the same bytes as another (first: {image} = {earlier}); "
                        "a run treats them as different images")
    if long_captions:
        warnings.append(f"{long_captions} caption(s) are over {CONTEXT_LENGTH} CLIP tokens: CLIP reads only the "
                        "first 77")
    return DataReport(
        source=source, rows=len(rows), images=len(per_image),
        captions_per_image=Spread.of(list(per_image.values())), caption_chars=Spread.of([len(c) for c in captions]),
        caption_tokens=Spread.of(list(token_counts)) if token_counts is not None else None,
        long_captions=long_captions,
        missing_images=no_image + sum(c.problem == "missing" for c in checks.values()),
        unreadable_images=sum(c.problem == "unreadable" for c in checks.values()),
        empty_captions=empty, duplicate_images=len(duplicates), image_sizes=sizes, broken_rows=len(problems),
        problems=problems[:MAX_PROBLEMS], warnings=warnings)


def plan_samples(rows: Iterable[SourceRow]) -> tuple[list[Sample], list[Problem]]:
    """One sample per distinct image, in the order of its first row, with the captions and rows of its good rows;
    and the rows that are broken before any image is fetched (empty caption, no image)."""
    order: dict[str, tuple[bytes | None, list[str], list[int]]] = {}
    problems = []
    for r in rows:
        reason = row_problem(r)
        if reason is not None or r.image is None:
            problems.append(Problem(r.row, reason or "no image"))
            continue
        _, captions, numbers = order.setdefault(r.image, (r.data, [], []))
        captions.append(r.caption)
        numbers.append(r.row)
    samples = [Sample(image, data, tuple(captions), tuple(numbers)) for image, (data, captions, numbers)
               in order.items()]
    return samples, problems


def sample_key(ordinal: int) -> str:
    """A sample's tar key: its image ordinal over the whole set, 9 digits."""
    return f"{ordinal:09d}"


def sample_members(ordinal: int, jpeg: bytes, sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample: the image, its first caption (what open_clip_train reads), and every caption
    with its source rows."""
    key = sample_key(ordinal)
    meta = {"captions": list(sample.captions), "rows": list(sample.rows)}
    return [(f"{key}.jpg", jpeg), (f"{key}.txt", sample.captions[0].encode()),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode())]


def manifests(shards: Sequence[ShardInfo], source: str) -> list[tuple[str, bytes]]:
    """``sizes.json`` (open_clip's convention) and ``kubetune-shards.json``, in the order they are written."""
    sizes = {s.name: s.images for s in shards}
    doc = {"version": MANIFEST_VERSION,
           "shards": [{"name": s.name, "images": s.images, "pairs": s.pairs} for s in shards],
           "images": sum(s.images for s in shards), "pairs": sum(s.pairs for s in shards), "source": source}
    return [(SIZES, _json_bytes(sizes)), (MANIFEST, _json_bytes(doc))]


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


# ------------------------------------------------------------------------------------------------ reading
def _trainer_data() -> Any:
    try:
        from kubetune_trainer import data
    except ImportError as exc:
        raise MissingExtra("checking or sharding a data set", "trainer", exc.name or "kubetune_trainer") from None
    return data


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """S3 as this machine sees it: the argument, else the environment (as ``kubetune models stage`` reads it)."""
    return endpoint or os.environ.get("KUBETUNE_S3_ENDPOINT") or os.environ.get(
        "AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def make_fetcher(cache_dir: Path, endpoint: str | None = None) -> Fetcher:
    """The trainer's fetcher with S3 at ``endpoint`` (credentials from ``$AWS_ACCESS_KEY_ID`` /
    ``$AWS_SECRET_ACCESS_KEY``) and a short retry window."""
    from kubetune.api.spec import OutputSpec
    from kubetune.storage import RetryPolicy

    data = _trainer_data()
    endpoint = s3_endpoint(endpoint)
    output = OutputSpec(endpoint=endpoint) if endpoint else None
    fetcher: Fetcher = data.Fetcher(cache_dir, output, retry=RetryPolicy.for_window(FETCH_RETRY_SECONDS))
    return fetcher


def _source_uri(source: str) -> str:
    return source if source.startswith(REMOTE) else str(Path(source.removeprefix("file://")).expanduser().resolve())


def read_rows(source: str, fetcher: Fetcher, text_column: str = "text", image_column: str = "image",
              fmt: str = "auto") -> list[SourceRow]:
    """The rows of a set as the trainer reads them; a missing set, a missing column or a file that is neither a
    CSV nor a DocList is :class:`ConfigInvalid` in one line."""
    data = _trainer_data()
    uri = _source_uri(source)
    kind = data.detect_format(uri, fmt)
    if kind not in ("csv", "doclist"):
        raise ConfigInvalid(f"{source}: {kind} data, not a CSV or DocList",
                            "check the CSV or DocList the shards were written from")
    _fetch(fetcher, uri, source)  # a missing or unreachable set in the tool's own words
    try:
        rows = data.read_rows("data", uri, DataSpec(train=uri, format=kind, text_column=text_column,
                                                    image_column=image_column), fetcher)
    except data.DataError as exc:
        hint = ("name them with --text-column and --image-column" if "no column" in exc.reason
                else "a set is a CSV with a header row, or a docarray DocList saved with protocol='protobuf'")
        where = f", row {exc.row}" if exc.row is not None else ""
        raise ConfigInvalid(f"{source}{where}: {exc.reason}", hint) from None
    return [SourceRow(r.row, r.text, "sha256:" + hashlib.sha256(r.data).hexdigest() if r.data is not None else r.uri,
                      r.data, r.error) for r in rows]


def _fetch(fetcher: Fetcher, uri: str, what: str) -> bytes:
    """The bytes of a set's file: a missing one is the user's mistake, an unreachable host is no such thing."""
    data = _trainer_data()
    try:
        return fetcher.read(uri)
    except FileNotFoundError:
        raise ConfigInvalid(f"{what} does not exist", "check the path or URI") from None
    except IsADirectoryError:
        raise ConfigInvalid(f"{what} is a directory", "give the CSV or DocList file") from None
    except ValueError as exc:  # minio's answer to a bad bucket name, urllib's to a bad URL
        raise ConfigInvalid(f"{what}: {exc}", "check the URI") from None
    except data.FetchUnavailable as exc:
        raise StorageUnavailable(f"reading {what}: {exc}", "is the S3 endpoint or web server reachable?") from None
    except data.DataError:  # the only one read() raises: s3:// without an endpoint
        raise ConfigInvalid(f"{what}: no S3 endpoint known on this machine",
                            "set KUBETUNE_S3_ENDPOINT (or AWS_ENDPOINT_URL)") from None


def _load(fetcher: Fetcher, image: str, data: bytes | None) -> tuple[bytes | None, ImageCheck]:
    """Fetch and fully decode one image (a truncated file fails here, not in epoch 7)."""
    from PIL import Image, UnidentifiedImageError

    from kubetune.storage import StoreError

    trainer = _trainer_data()
    try:
        raw = data if data is not None else fetcher.read(image)
    except trainer.FetchUnavailable as exc:  # the whole set is out of reach, not this image
        raise StorageUnavailable(f"fetching {image}: {exc}", "is the S3 endpoint or web server reachable?") from None
    except trainer.DataError:  # the only one read() raises: s3:// without an endpoint
        raise ConfigInvalid(f"{image}: no S3 endpoint known on this machine",
                            "set KUBETUNE_S3_ENDPOINT (or AWS_ENDPOINT_URL)") from None
    except FileNotFoundError:
        return None, ImageCheck(image, "missing")
    except (StoreError, ValueError) as exc:  # refused (HTTP 403, a refused credential), a bad URI (bucket name)
        return None, ImageCheck(image, "missing", str(exc)[:120])
    except OSError as exc:  # a directory, no permission
        return None, ImageCheck(image, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"[:120])
    try:
        with Image.open(io.BytesIO(raw)) as decoded:
            decoded.load()
            width, height, fmt = decoded.width, decoded.height, decoded.format or ""
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        return None, ImageCheck(image, "unreadable", f"{type(exc).__name__}: {str(exc)[:120]}")
    return raw, ImageCheck(image, None, "", hashlib.sha256(raw).hexdigest(), width, height, fmt)


def in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn`` over ``items`` in the pool, results in the order of ``items``, at most ``window`` in flight (so at most
    that many results are held). An exception cancels what has not started and propagates."""
    pending: deque[Future[R]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            for item in source:  # the next one only once the caller is done with this one
                pending.append(pool.submit(fn, item))
                break
    finally:
        for future in pending:
            future.cancel()


# ------------------------------------------------------------------------------------------------ validate
@lru_cache(maxsize=1)
def _clip_tokenizer() -> Any:
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        return None
    return SimpleTokenizer()


def token_counts(captions: Sequence[str]) -> list[int] | None:
    """CLIP's token count of each caption (with its start and end tokens), None without open_clip."""
    tokenizer = _clip_tokenizer()
    if tokenizer is None:
        return None
    counted: dict[str, int] = {}
    for caption in captions:
        if caption not in counted:
            counted[caption] = len(tokenizer.encode(caption)) + 2
    return [counted[c] for c in captions]


def validate_set(source: str, *, text_column: str = "text", image_column: str = "image", fmt: str = "auto",
                 workers: int = 8, tokens: bool = True, local_images_only: bool = False,
                 endpoint: str | None = None, on_progress: Progress | None = None) -> DataReport:
    """Read a set, fetch and fully decode every distinct image (``workers`` at a time) and summarise it.

    ``tokens``: count CLIP tokens per caption when open_clip is installed. ``local_images_only``: leave images
    at s3:// or http(s) URIs unchecked (the check before an upload: the trainer fetches those itself).
    Raises :class:`ConfigInvalid` (a missing set, a missing column, no rows, not a CSV or DocList),
    :class:`StorageUnavailable` (S3 or a web server unreachable), :class:`MissingExtra` (no trainer extra).
    """
    with tempfile.TemporaryDirectory(prefix="kubetune-data-") as tmp:
        fetcher = make_fetcher(Path(tmp), endpoint)
        rows = read_rows(source, fetcher, text_column, image_column, fmt)
        if not rows:
            raise ConfigInvalid(f"{source}: no rows, only a header", "a set needs at least one (caption, image) row")
        inline = {r.image: r.data for r in rows if r.image is not None and r.data is not None}
        images = [image for image in dict.fromkeys(r.image for r in rows if r.image is not None)
                  if not (local_images_only and image.startswith(REMOTE))]

        def check(image: str) -> ImageCheck:
            return _load(fetcher, image, inline.get(image))[1]

        checks: dict[str, ImageCheck] = {}
        if on_progress:
            on_progress(0, len(images))
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kubetune-data") as pool:
            for done, result in enumerate(in_order(pool, check, images, max(1, workers) * 4), 1):
                checks[result.image] = result
                if on_progress:
                    on_progress(done, len(images))
    counts = token_counts([r.caption for r in rows if r.caption.strip()]) if tokens else None
    return summarise(source, rows, checks, counts)


def check_local_set(path: Path, set_name: str, data: DataSpec, workers: int = 8) -> DataReport:
    """The check before a local set is uploaded: :class:`ConfigInvalid` naming the first broken rows (its local
    images missing or unreadable, empty captions, a missing column), unless ``data.skipBadRows`` lets the run skip
    them (then only a warning is logged)."""
    report = validate_set(str(path), text_column=data.text_column, image_column=data.image_column,
                          fmt=str(data.format), workers=workers, tokens=False, local_images_only=True)
    if report.ok:
        return report
    what = f"spec.data.{set_name} {path}: {report.broken_rows} broken row(s) of {report.rows}"
    if data.skip_bad_rows:
        log.warning("%s (the run skips them: data.skipBadRows): %s", what, report.first_problems())
        return report
    raise ConfigInvalid(f"{what}: {report.first_problems()}",
                        f"fix or drop them (`kubetune data validate {path}` lists them), set data.skipBadRows to "
                        "train without them, or skip this check with validate=False / --no-validate")


# ------------------------------------------------------------------------------------------------ shard
def open_dest(dest: str, endpoint: str | None = None) -> Store:
    """``s3://bucket/prefix/`` or a local directory, as a store."""
    from kubetune.storage import LocalStore, s3_store

    if dest.startswith("s3://"):
        found = s3_endpoint(endpoint)
        if not found:
            raise ConfigInvalid("no S3 endpoint known on this machine",
                                "set KUBETUNE_S3_ENDPOINT (or AWS_ENDPOINT_URL)")
        try:
            return s3_store(found, dest)
        except ValueError as exc:
            raise ConfigInvalid(f"{dest!r}: {exc}", "name it as s3://BUCKET/PREFIX/") from None
    if dest.startswith(("http://", "https://")):
        raise ConfigInvalid(f"{dest}: shards are written to s3:// or a local directory", "e.g. s3://BUCKET/shards/")
    path = Path(dest.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigInvalid(f"{dest}: is a file", "give a directory (it is created when missing)")
    return LocalStore(path)


def _prefix_uri(store: Store) -> str:
    return store.uri().rstrip("/") + "/"


def _jpeg(raw: bytes, check: ImageCheck) -> bytes:
    """The image as the shard stores it: JPEG bytes as they were, anything else re-encoded (RGB, quality 95)."""
    if check.format == "JPEG":
        return raw
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        rgb = image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class _ShardWriter:
    """Shards built one at a time in a temporary file, each uploaded when full (or at the end)."""

    def __init__(self, store: Store, work: Path, shard_size: int) -> None:
        self.store, self.work, self.shard_size = store, work, shard_size
        self.shards: list[ShardInfo] = []
        self.images = 0  # the next sample's ordinal
        self._tar: tarfile.TarFile | None = None
        self._path = work / "shard.tar"
        self._count = self._pairs = 0

    def add(self, sample: Sample, jpeg: bytes) -> None:
        if self._tar is None:
            # GNU format, fixed owner, mode and time: the same set gives the same bytes
            self._tar = tarfile.open(self._path, "w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - open across adds
        for name, data in sample_members(self.images, jpeg, sample):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.images += 1
        self._count += 1
        self._pairs += len(sample.captions)
        if self._count >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = SHARD_NAME.format(len(self.shards))
        self.store.put_file(name, self._path)
        self._path.unlink()
        self.shards.append(ShardInfo(name, self._count, self._pairs))
        self._tar, self._count, self._pairs = None, 0, 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def write_shards(source: str, dest: str, *, shard_size: int = 1000, workers: int = 8, skip_bad_rows: bool = False,
                 text_column: str = "text", image_column: str = "image", fmt: str = "auto",
                 endpoint: str | None = None, on_progress: Progress | None = None) -> ShardResult:
    """Write a set as WebDataset shards under ``dest`` (``s3://bucket/prefix/`` or a local directory).

    A broken row is :class:`ConfigInvalid` naming it (shards written before it stay, without
    ``kubetune-shards.json``: the set reads as incomplete); with ``skip_bad_rows`` it is left out and counted.
    Writing a set where one was replaces it: its manifest goes first, its surplus shards before the new manifest.
    """
    from kubetune.storage import StoreError, StoreUnavailable

    if shard_size < 1:
        raise ConfigInvalid(f"shard size {shard_size}: must be at least 1", "e.g. --shard-size 1000")
    store = open_dest(dest, endpoint)
    with tempfile.TemporaryDirectory(prefix="kubetune-shard-") as tmp:
        fetcher = make_fetcher(Path(tmp) / "cache", endpoint)
        rows = read_rows(source, fetcher, text_column, image_column, fmt)
        samples, problems = plan_samples(rows)
        if problems and not skip_bad_rows:
            raise _broken(source, problems[0])
        try:
            store.check()
            for name in (MANIFEST, SIZES):  # from here until both are written again, the set reads as incomplete
                store.delete(name)
            writer = _ShardWriter(store, Path(tmp), shard_size)
            try:
                _write_samples(writer, samples, problems, fetcher, workers, skip_bad_rows, source, on_progress)
            finally:
                writer.close()
            for key in store.list():
                if SHARD_PATTERN.fullmatch(key) and key not in {s.name for s in writer.shards}:
                    store.delete(key)
            if not writer.shards:
                raise ConfigInvalid(f"{source}: no usable pairs", "every row is broken: "
                                    + "; ".join(f"row {p.row}: {p.reason}" for p in problems[:3]))
            for name, data in manifests(writer.shards, _source_uri(source)):
                store.put_bytes(name, data)
        except KubetuneError:  # StorageUnavailable is an OSError too: said as it is
            raise
        except StoreUnavailable as exc:
            raise StorageUnavailable(f"writing shards to {store.uri()}: {exc}",
                                     "is the S3 endpoint reachable?") from None
        except StoreError as exc:
            raise StorageUnavailable(f"writing shards to {store.uri()}: {exc}",
                                     "check the bucket and the credentials (AWS_ACCESS_KEY_ID...)") from None
        except OSError as exc:
            raise ConfigInvalid(f"writing shards to {store.uri()}: {exc.strerror or exc}",
                                "give a directory you can write to") from None
    problems.sort(key=lambda p: p.row)
    return ShardResult(source=source, dest=_prefix_uri(store), shards=writer.shards, images=writer.images,
                       pairs=sum(s.pairs for s in writer.shards), skipped_rows=len(problems),
                       problems=problems[:MAX_PROBLEMS])


def _write_samples(writer: _ShardWriter, samples: list[Sample], problems: list[Problem], fetcher: Fetcher,
                   workers: int, skip_bad_rows: bool, source: str, on_progress: Progress | None) -> None:
    def load(sample: Sample) -> tuple[Sample, bytes | None, ImageCheck]:
        raw, check = _load(fetcher, sample.image, sample.data)
        return sample, (_jpeg(raw, check) if raw is not None else None), check

    window = max(1, min(writer.shard_size, workers * 4))  # at most a shard's worth of images in memory
    if on_progress:
        on_progress(0, len(samples))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kubetune-shard") as pool:
        for done, (sample, jpeg, check) in enumerate(in_order(pool, load, samples, window), 1):
            if jpeg is None:
                broken = [Problem(row, image_problem(check)) for row in sample.rows]
                if not skip_bad_rows:
                    raise _broken(source, broken[0])
                problems.extend(broken)
            else:
                writer.add(sample, jpeg)
            if on_progress:
                on_progress(done, len(samples))
    writer.flush()


def _broken(source: str, problem: Problem) -> ConfigInvalid:
    return ConfigInvalid(f"{source}, row {problem.row}: {problem.reason}",
                         "fix or drop the row (`kubetune data validate` lists every broken row), or pass "
                         "--skip-bad-rows to leave broken rows out")


__all__ = ["DataReport", "ImageCheck", "Problem", "Sample", "ShardInfo", "ShardResult", "SourceRow", "Spread",
           "check_local_set", "manifests", "plan_samples", "read_rows", "sample_members", "summarise",
           "validate_set", "write_shards"]
