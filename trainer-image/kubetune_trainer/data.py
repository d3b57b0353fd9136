"""Datasets of (text, image) pairs: CSV files or docarray v2 DocLists serialised as protobuf.

Images are s3://, http(s)://, file:// or local paths (relative paths are relative to the CSV), or bytes /
uint8 tensors inside a DocList. Data is never unpickled: DocLists are read with the protobuf protocol only.

Rows are read up front (texts and image references only, so memory is a few hundred bytes a row). A set of at
most ``spec.data.checkRowsUpTo`` rows also has every image fetched and decoded before the first step, so a broken
row fails the run at once (not in epoch 7) with a :class:`DataError` naming the set, the row and the reason, or
is skipped and counted when ``spec.data.skipBadRows`` is set; its decoded images are kept in memory up to a small
budget. A larger set is read lazily: loader workers fetch and decode each image when its batch is built, and a
bad row is met then (see :class:`BadRows`). Remote images land in an on-disk cache bounded by
``spec.data.cacheSize``, evicted least recently used (:class:`~kubetune_trainer.cache.DiskBudget`).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import posixpath
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from kubetune.api.quantity import parse_quantity
from kubetune.api.spec import DataSpec, FinetuneRunSpec, OutputSpec
from kubetune.storage import ObjectNotFound, RetryPolicy, StoreError, minio_client, parse_s3_uri, refusal
from PIL import Image, UnidentifiedImageError

from .cache import DiskBudget, KeyLocks, exclusive_lock, write_atomically

log = logging.getLogger(__name__)

DOCLIST_TEXT_FIELDS = ("text", "caption", "title")
DOCLIST_URL_FIELDS = ("image", "url", "image_url", "uri")
DOCLIST_BYTES_FIELDS = ("image_bytes", "bytes_", "blob")
DOCLIST_TENSOR_FIELDS = ("tensor", "image_tensor")
DOCLIST_PROTOCOLS: tuple[Literal["protobuf-array"], Literal["protobuf"]] = ("protobuf-array", "protobuf")
DEFAULT_CACHE_BYTES = 256 << 20  # decoded RGB pixels of a checked set kept in memory (per process)
DEFAULT_DISK_CACHE_BYTES = 10 << 30
IMAGE_ERRORS = (FileNotFoundError, UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
                ValueError)
REMOTE_SCHEMES = ("s3://", "http://", "https://")  # fetched into the disk cache; anything else is a local file
MIN_ROWS_FOR_LIMIT = 100  # below this many rows read, one bad row is no evidence that the set is broken


class DataError(Exception):
    """A dataset or one of its rows is broken (permanent: exit code 65)."""

    def __init__(self, set_name: str, row: int | None, reason: str) -> None:
        self.set_name, self.row, self.reason = set_name, row, reason
        where = f"{set_name} set" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {reason}")


class FetchUnavailable(Exception):
    """A remote source could not be reached (retryable: exit code 75)."""


@dataclass(slots=True)
class ImageRef:
    """One image: a file (local, or remote through ``fetcher``'s disk cache) or bytes in memory; ``key``
    identifies it (URI or sha256 of the bytes)."""

    key: str
    uri: str | None = None
    fetcher: Fetcher | None = None
    data: bytes | None = None
    decoded: Image.Image | None = None

    def open(self) -> Image.Image:
        if self.decoded is not None:
            return self.decoded
        if self.data is not None:
            source: Any = io.BytesIO(self.data)
        elif self.uri is not None and self.fetcher is not None:
            source = self.fetcher.open(self.uri)
        else:  # pragma: no cover - constructed with one of them
            raise ValueError(f"{self.key}: no image source")
        with source, Image.open(source) as image:
            image.load()
            return image.convert("RGB")


def open_image(ref: ImageRef) -> tuple[Image.Image | None, str]:
    """The image, or None and why it is unusable. An unreachable source or a full disk raises: those are the
    pod's trouble, not the row's."""
    try:
        return ref.open(), ""
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        if isinstance(exc, FileNotFoundError):
            return None, f"image {ref.uri or ref.key} not found"
        return None, unreadable(ref.uri or ref.key, exc)
    except IMAGE_ERRORS as exc:
        return None, unreadable(ref.uri or ref.key, exc)


def unreadable(what: str, exc: BaseException) -> str:
    return f"image {what} is unreadable ({type(exc).__name__}: {str(exc)[:120]})"


@dataclass(slots=True)
class Pair:
    text: str
    image: ImageRef
    row: int  # 1-based data row in its source (CSV: line number minus the header)


@dataclass
class PairSet:
    name: str
    pairs: list[Pair]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def texts(self) -> list[str]:
        return [p.text for p in self.pairs]

    def keyed(self) -> list[tuple[str, str]]:
        return [(p.text, p.image.key) for p in self.pairs]


def _unavailable(error: Exception, tries: int) -> FetchUnavailable:
    return FetchUnavailable(f"{error} (unreachable after {tries} {'try' if tries == 1 else 'tries'})")


class Fetcher:
    """Reads bytes from s3://, http(s)://, file:// or local paths; remote files are cached on disk."""

    def __init__(self, cache_dir: Path, output: OutputSpec | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, max_bytes: int = DEFAULT_DISK_CACHE_BYTES) -> None:
        self.cache_dir = cache_dir
        self.output = output
        self.timeout = timeout
        # An unreachable source is retried with the store's backoff for spec.output.retrySeconds, so an S3 or
        # HTTP outage while the data loads is ridden out in-process, as during checkpoints and uploads.
        self.retry = retry or (RetryPolicy.for_window(output.retry_seconds) if output else RetryPolicy())
        self.budget = DiskBudget(cache_dir, max_bytes)
        self._forked()

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker started by spawn or forkserver gets a copy without connections or locks
        return {k: v for k, v in self.__dict__.items() if k not in ("_s3", "_keys", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forked()

    def open(self, uri: str) -> BinaryIO:
        """``uri``'s bytes as an open file (through the disk cache for remote URIs; one evicted between lookup
        and open is fetched again)."""
        try:
            return self.local_path(uri).open("rb")
        except FileNotFoundError:
            if not uri.startswith(REMOTE_SCHEMES):
                raise
            return self.local_path(uri).open("rb")

    def _forked(self) -> None:
        # a loader worker forked from the trainer must not share its S3 connections or inherit a held lock
        self._pid = os.getpid()
        self._s3: Any = None
        self._keys = KeyLocks()

    def _s3_client(self) -> Any:
        if self._pid != os.getpid():
            self._forked()
        if self._s3 is None:
            if self.output is None or not self.output.endpoint:
                raise DataError("data", None, "s3:// data needs spec.output.endpoint")
            self._s3 = minio_client(self.output.endpoint, self.output.region)
        return self._s3

    def list(self, prefix: str) -> list[str]:
        """The object URIs under an s3:// prefix or in a local directory (recursively), sorted."""
        if prefix.startswith(("http://", "https://")):
            raise DataError("data", None, f"{prefix}: an http(s) prefix cannot be listed; name the files with a brace "
                                          "pattern (e.g. .../shard-{000000..000099}.tar)")
        if not prefix.startswith("s3://"):
            root = Path(prefix.removeprefix("file://"))
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: no such directory")
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        bucket, key = parse_s3_uri(prefix)
        return self.retry.run(lambda: self._s3_call(prefix, lambda: sorted(
            f"s3://{bucket}/{o.object_name}" for o in self._s3_client().list_objects(bucket, prefix=key,
                                                                                     recursive=True))),
            what=prefix, transient=FetchUnavailable, give_up=_unavailable, log=log, label="list", describe=str)

    def _s3_call(self, uri: str, call: Callable[[], Any]) -> Any:
        """``call()``, its S3 errors sorted into not found, refused (permanent) and unavailable (retried)."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise FileNotFoundError(f"{uri}: {exc.code}") from None
            error = refusal(uri, exc.code, exc.message)  # a refused credential is no outage: no retrying it
            if error is not None:
                raise error from None
            raise FetchUnavailable(f"{uri}: {exc.code}") from None
        except (HTTPError, OSError, StoreError) as exc:
            if isinstance(exc, ObjectNotFound):
                raise FileNotFoundError(uri) from None
            raise FetchUnavailable(f"{uri}: {type(exc).__name__}") from None

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; FileNotFoundError when it does not exist, FetchUnavailable when it stayed
        unreachable for the whole retry window."""

        return self.retry.run(lambda: self._read_once(uri), what=uri, transient=FetchUnavailable,
                              give_up=_unavailable, log=log, label="fetch", describe=str)

    def _read_once(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            bucket, key = parse_s3_uri(uri)

            def get() -> bytes:
                response = self._s3_client().get_object(bucket, key)
                try:
                    return bytes(response.read())
                finally:
                    response.close()
                    response.release_conn()

            return bytes(self._s3_call(uri, get))
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(uri, timeout=self.timeout) as response:
                    return bytes(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code in (404, 410):
                    raise FileNotFoundError(f"{uri}: HTTP {exc.code}") from None
                if 400 <= exc.code < 500 and exc.code not in (408, 425, 429):  # refused, not unavailable
                    raise StoreError(f"{uri}: HTTP {exc.code} {exc.reason}") from None
                raise FetchUnavailable(f"{uri}: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise FetchUnavailable(f"{uri}: {type(exc).__name__}") from None
        return Path(uri.removeprefix("file://")).read_bytes()

    def local_path(self, uri: str) -> Path:
        """A local file holding ``uri`` (downloaded into the disk cache for remote URIs; a path returned stays for
        at least the cache's grace period, so open it right away).

        One download per URI and cache directory, however many threads of this process and processes (DDP ranks,
        loader workers) ask at once: the losers wait for the winner and reuse its file. The file only ever appears
        complete, under its final name, by an atomic rename.
        """
        if not uri.startswith(REMOTE_SCHEMES):
            path = Path(uri.removeprefix("file://"))
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            return path
        if self._pid != os.getpid():
            self._forked()
        suffix = Path(urllib.parse.urlparse(uri).path).suffix[:10]
        name = hashlib.sha256(uri.encode()).hexdigest()[:32]
        target = self.cache_dir / (name + suffix)
        if self.budget.touch(target):  # the common case once fetched: no lock, no lock file
            return target
        fetched = 0
        with self._keys.hold(name):
            locks = self.cache_dir / ".locks"
            locks.mkdir(parents=True, exist_ok=True)
            # striped: a lock file per 4096th of the keys, not one per image of a million-image set
            with exclusive_lock(locks / f"{name[:3]}.lock"):
                if not self.budget.touch(target):  # another thread or process may have fetched it meanwhile
                    data = self.read(uri)
                    write_atomically(target, data, prefix=name)
                    fetched = len(data)
        if fetched:
            self.budget.added(fetched)
        return target


def disk_cache_bytes(spec: FinetuneRunSpec) -> int:
    """The trainer's disk cache: data.cacheSize, else half the pod's ephemeral storage, else 10 GiB."""
    if spec.data.cache_size:
        return int(parse_quantity(spec.data.cache_size))
    if spec.resources.ephemeral_storage:
        return int(parse_quantity(spec.resources.ephemeral_storage) // 2)
    return DEFAULT_DISK_CACHE_BYTES


def resolve_uri(value: str, base: str) -> str:
    """An image reference from a CSV row, resolved against the CSV's own location."""
    value = value.strip()
    if value.startswith(("s3://", "http://", "https://", "file://", "/")):
        return value
    if base.startswith("s3://"):  # urljoin does not know the s3 scheme
        bucket, key = parse_s3_uri(base)
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(key), value)).lstrip("/")
    if base.startswith(("http://", "https://")):
        return urllib.parse.urljoin(base, value)
    return str((Path(base.removeprefix("file://")).parent / value).resolve())


def detect_format(uri: str, fmt: str) -> str:
    """csv, doclist or webdataset: ``fmt`` unless it is auto, else by the URI's shape."""
    if fmt != "auto":
        return fmt
    path = urllib.parse.urlparse(uri).path.lower()
    if path.endswith((".csv", ".tsv")):
        return "csv"
    return "webdataset" if looks_like_shards(uri) else "doclist"


def looks_like_shards(uri: str) -> bool:
    """Whether ``data.format: auto`` means webdataset: a .tar, a brace pattern, or a prefix ending in /."""
    return uri.endswith(("/", ".tar")) or ("{" in uri and ".." in uri and "}" in uri)


def read_csv_rows(text: str, set_name: str, text_column: str, image_column: str) -> list[tuple[int, str, str]]:
    dialect = csv.excel_tab if "\t" in text.split("\n", 1)[0] and "," not in text.split("\n", 1)[0] else csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    columns = reader.fieldnames or []
    for column in (text_column, image_column):
        if column not in columns:
            raise DataError(set_name, None, f"no column {column!r} (columns: {', '.join(columns) or 'none'})")
    rows: list[tuple[int, str, str]] = []
    try:
        for i, row in enumerate(reader, 1):
            rows.append((i, row.get(text_column) or "", row.get(image_column) or ""))
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (a huge caption)
        raise DataError(set_name, len(rows) + 1, f"malformed CSV ({exc})") from None
    return rows


def _first(doc: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = doc.get(name)
        if value is not None and not (isinstance(value, str | bytes) and not value):
            return value
    return None


def read_doclist(data: bytes, set_name: str) -> list[dict[str, Any]]:
    """Decode a DocList serialised with a protobuf protocol (any docarray compression) into plain dicts.

    Only the protobuf protocols are tried, never pickle: data from a bucket is not trusted code.
    """
    from docarray import DocList
    from docarray.base_doc import AnyDoc

    errors = set()
    for protocol in DOCLIST_PROTOCOLS:
        for compress in _compressions(data):
            try:
                docs = DocList[AnyDoc].from_bytes(data, protocol=protocol, compress=compress)
                return [_doc_to_dict(doc) for doc in docs]
            except Exception as exc:
                errors.add(type(exc).__name__)
    tried = ", ".join(sorted(errors))
    raise DataError(set_name, None, f"neither a CSV nor a protobuf-serialised DocList ({tried})")


def _compressions(data: bytes) -> list[str | None]:
    """Whole-payload magic first (protobuf-array); per-document compression (protobuf) has none: try all."""
    magic = {b"\x04\x22\x4d\x18": "lz4", b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ": "lzma"}
    first = [name for prefix, name in magic.items() if data.startswith(prefix)]
    rest = [c for c in (None, "lz4", "gzip", "zlib", "bz2", "lzma") if c not in first]
    return [*first, *rest]


def _doc_to_dict(doc: Any) -> dict[str, Any]:
    values = dict(doc.__dict__)
    values.pop("id", None)
    return values


def _doc_image(doc: dict[str, Any], image_column: str, base: str) -> tuple[str | None, bytes | None]:
    """(uri, bytes) for one doc; at most one is set."""
    value = _first(doc, (image_column, *DOCLIST_URL_FIELDS, *DOCLIST_BYTES_FIELDS, *DOCLIST_TENSOR_FIELDS))
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return None, value
    if isinstance(value, str):
        return resolve_uri(value, base), None
    import numpy as np

    array = np.asarray(value)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image tensor of shape {tuple(array.shape)} is not H×W×C")
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return None, buffer.getvalue()


@dataclass
class Row:
    """One row as read: its text and image reference (a URI, or bytes a DocList holds), or why it is unreadable."""

    row: int
    text: str
    uri: str | None
    data: bytes | None
    error: str | None = None


@dataclass
class BadRows:
    """Rows of one set met broken while training reads it lazily; :meth:`record` says when the run must stop.

    Without ``skip`` the first one stops it, naming its row. With ``skip`` they are counted, and the run stops
    once more than ``limit`` of the rows read so far (at least :data:`MIN_ROWS_FOR_LIMIT`) were bad.
    """

    set_name: str
    skip: bool
    limit: float
    read: int = 0
    bad: int = 0
    first: list[str] = field(default_factory=list)

    def record(self, rows_read: int, bad: Sequence[tuple[int, str]]) -> DataError | None:
        self.read += rows_read
        self.bad += len(bad)
        for row, reason in bad:
            if not self.skip:
                return DataError(self.set_name, row, reason)
            if len(self.first) < 5:
                self.first.append(f"row {row}: {reason}")
                log.warning("%s set, row %d skipped: %s", self.set_name, row, reason)
        return over_limit(self.set_name, self.bad, self.read, self.limit, self.first) if self.skip else None

    def record_batch(self, rows: Sequence[int], reasons: Sequence[str], unusable: str = "") -> DataError | None:
        """:meth:`record` for one loaded batch: each sample's broken row (0: none) and reason; a reason starting
        with ``unusable`` (no stand-in found for the sample) stops the run whatever ``skip`` says."""
        bad = [(row, why) for row, why in zip(rows, reasons, strict=True) if row]
        hopeless = next(((row, why) for row, why in bad if unusable and why.startswith(unusable)), None)
        if hopeless is not None:
            return DataError(self.set_name, hopeless[0], hopeless[1])
        return self.record(len(reasons), bad)


def over_limit(set_name: str, bad: int, read: int, limit: float, first: Sequence[str]) -> DataError | None:
    """The error that stops a run whose skipped rows exceed ``limit`` of those read, else None."""
    if read < MIN_ROWS_FOR_LIMIT or bad <= limit * read:
        return None
    examples = f" (first: {'; '.join(first[:3])})" if first else ""
    return DataError(set_name, None, f"{bad} of {read} rows read were bad, over data.badRowLimit {limit:g}: check "
                                     f"the image column and paths{examples}")


def _pair_or_reason(row: Row, fetcher: Fetcher, refs: dict[str, ImageRef]) -> Pair | str:
    """The row's pair (its image not fetched yet), or why it is unusable without looking at the image."""
    if row.error is not None:
        return row.error
    if not row.text.strip():
        return "empty text"
    if row.data is not None:
        key = "sha256:" + hashlib.sha256(row.data).hexdigest()
        ref = refs.setdefault(key, ImageRef(key=key, data=row.data))
    elif row.uri is not None:
        ref = refs.setdefault(row.uri, ImageRef(key=row.uri, uri=row.uri, fetcher=fetcher))
    else:
        return "no image"
    return Pair(text=row.text, image=ref, row=row.row)


def check_ref(ref: ImageRef, budget: list[int]) -> str | None:
    """Fetch and decode ``ref`` now; why it is unusable, or None (its pixels kept while ``budget`` lasts)."""
    decoded, why = open_image(ref)
    if decoded is None:
        return why
    size = decoded.width * decoded.height * 3
    if budget[0] >= size:
        budget[0] -= size
        ref.decoded = decoded
    return None


def load_set(set_name: str, uri: str, data_spec: DataSpec, fetcher: Fetcher, workers: int = 8,
             cache_budget: list[int] | None = None, check: bool | None = None) -> PairSet:
    """Load one set of pairs; ``cache_budget`` is a shared [bytes left] for decoded images.

    ``check`` (default: at most ``data_spec.check_rows_up_to`` rows) fetches and decodes every image now.
    """
    rows = read_rows(set_name, uri, data_spec, fetcher)
    refs: dict[str, ImageRef] = {}
    results = [_pair_or_reason(row, fetcher, refs) for row in rows]
    if check if check is not None else len(rows) <= data_spec.check_rows_up_to:
        budget = cache_budget if cache_budget is not None else [DEFAULT_CACHE_BYTES]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            broken = {key: reason for key, reason in zip(refs, pool.map(lambda r: check_ref(r, budget),
                                                                          refs.values()), strict=True) if reason}
        results = [broken.get(r.image.key, r) if isinstance(r, Pair) else r for r in results]
    out = PairSet(set_name, [])
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, Pair):
            out.pairs.append(result)
        elif data_spec.skip_bad_rows:
            out.skipped += 1
            if len(out.skip_reasons) < 20:
                out.skip_reasons.append(f"row {row.row}: {result}")
        else:
            raise DataError(set_name, row.row, result)
    if out.skipped:
        log.warning("%s set: skipped %d bad rows (first: %s)", set_name, out.skipped, out.skip_reasons[0])
        error = over_limit(set_name, out.skipped, len(rows), data_spec.bad_row_limit, out.skip_reasons)
        if error is not None:
            raise error
    if not out.pairs:
        raise DataError(set_name, None, f"{uri} holds no usable pairs")
    return out


def read_rows(set_name: str, uri: str, data_spec: DataSpec, fetcher: Fetcher) -> list[Row]:
    """Every row of a CSV or DocList: its text and image reference (nothing fetched)."""
    try:
        raw = fetcher.read(uri)
    except FileNotFoundError:
        raise DataError(set_name, None, f"{uri} does not exist") from None
    # only the train set can be streamed shards: the others are read row by row whatever data.format says
    fmt = detect_format(uri, "auto" if data_spec.format == "webdataset" else data_spec.format)
    if fmt == "webdataset":
        raise DataError(set_name, None, f"{uri}: shards can only be the train set; this one must be a CSV or DocList")
    rows: list[Row] = []
    if fmt == "csv":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(set_name, None, f"{uri} is not UTF-8 text") from None
        del raw
        for i, caption, image in read_csv_rows(text, set_name, data_spec.text_column, data_spec.image_column):
            rows.append(Row(i, caption, resolve_uri(image, uri) if image.strip() else None, None))
        return rows
    for i, doc in enumerate(read_doclist(raw, set_name), 1):
        caption = _first(doc, (data_spec.text_column, *DOCLIST_TEXT_FIELDS))
        try:
            image_uri, image_bytes = _doc_image(doc, data_spec.image_column, uri)
        except ValueError as exc:
            rows.append(Row(i, str(caption or ""), None, None, error=str(exc)))
            continue
        rows.append(Row(i, str(caption) if caption is not None else "", image_uri, image_bytes))
    return rows


def split(pairs: PairSet, fraction: float, seed: int) -> tuple[PairSet, PairSet]:
    """Deterministic train/validation split: the validation set gets round(fraction × n) pairs (≥ 1)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    if n_val >= len(order):
        raise DataError(pairs.name, None, f"valSplit {fraction} leaves no training pairs out of {len(order)}")
    val_ids, train_ids = set(order[:n_val]), order[n_val:]
    train = PairSet(pairs.name, [pairs.pairs[i] for i in sorted(train_ids)], pairs.skipped, pairs.skip_reasons)
    val = PairSet("validation", [pairs.pairs[i] for i in sorted(val_ids)])
    return train, val


@dataclass
class Datasets:
    train: PairSet
    val: PairSet | None  # for validation loss
    query: PairSet | None  # for retrieval evaluation
    index: PairSet | None
    reference: PairSet | None = None  # the domain WiSE-FT's sweep must keep (queries and index)
    zero_shot: PairSet | None = None  # labelled images: the text is the class name

    def skipped(self) -> dict[str, int]:
        sets = [self.train, self.val, self.query, self.index, self.reference, self.zero_shot]
        return {s.name: s.skipped for s in sets if s is not None and s.skipped}


def load_datasets(data_spec: DataSpec, fetcher: Fetcher, seed: int,
                  on_progress: Callable[[str], None] | None = None) -> Datasets:
    """train, val (eval data or the valSplit), query (query data or val) and index (index data or query)."""
    loaded: dict[str, PairSet] = {}
    budget = [DEFAULT_CACHE_BYTES]

    def get(name: str, uri: str) -> PairSet:
        if uri not in loaded:
            if on_progress:
                on_progress(f"loading {name} set from {uri}")
            loaded[uri] = load_set(name, uri, data_spec, fetcher, cache_budget=budget)
        return loaded[uri]

    streamed = detect_format(data_spec.train, data_spec.format) == "webdataset"
    # streamed shards are opened by the training loop (shards.py); only the evaluation sets are loaded here
    train = PairSet("train", []) if streamed else get("train", data_spec.train)
    val: PairSet | None = None
    if data_spec.eval:
        val = get("eval", data_spec.eval)
    elif data_spec.val_split > 0:
        if streamed:
            raise DataError("train", None, "data.valSplit cannot hold out part of a streamed (webdataset) set: give "
                                           "data.eval, or shard the held-out pairs apart")
        train, val = split(train, data_spec.val_split, seed)
    query = get("query", data_spec.query) if data_spec.query else val
    index = get("index", data_spec.index) if data_spec.index else query
    reference = get("reference", data_spec.reference) if data_spec.reference else None
    zero_shot = get("zeroShot", data_spec.zero_shot) if data_spec.zero_shot else None
    return Datasets(train=train, val=val, query=query, index=index, reference=reference, zero_shot=zero_shot)
