"""Datasets of (text, image) pairs: CSV files or docarray v2 DocLists serialised as protobuf.

Images are s3://, http(s)://, file:// or local paths (relative paths are relative to the CSV), or bytes /
uint8 tensors inside a DocList. Data is never unpickled: DocLists are read with the protobuf protocol only.

Every image is fetched and decoded once while loading, so a broken row fails the run at the start (not in
epoch 7) with a :class:`DataError` naming the set, the row and the reason, or is skipped and counted when
``spec.data.skipBadRows`` is set. Decoded images are kept in memory up to a budget, which makes epochs
after the first cheaper than open_clip's per-step ``Image.open``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import posixpath
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune.api.spec import DataSpec, OutputSpec
from kubetune.storage import ObjectNotFound, RetryPolicy, StoreError, minio_client, parse_s3_uri, refusal
from PIL import Image, UnidentifiedImageError

from .cache import KeyLocks, exclusive_lock, write_atomically

log = logging.getLogger(__name__)

DOCLIST_TEXT_FIELDS = ("text", "caption", "title")
DOCLIST_URL_FIELDS = ("image", "url", "image_url", "uri")
DOCLIST_BYTES_FIELDS = ("image_bytes", "bytes_", "blob")
DOCLIST_TENSOR_FIELDS = ("tensor", "image_tensor")
DOCLIST_PROTOCOLS: tuple[Literal["protobuf-array"], Literal["protobuf"]] = ("protobuf-array", "protobuf")
DEFAULT_CACHE_BYTES = 1 << 30  # decoded RGB pixels kept in memory (per process), 1 GiB


class DataError(Exception):
    """A dataset or one of its rows is broken (permanent: exit code 65)."""

    def __init__(self, set_name: str, row: int | None, reason: str) -> None:
        self.set_name, self.row, self.reason = set_name, row, reason
        where = f"{set_name} set" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {reason}")


class FetchUnavailable(Exception):
    """A remote source could not be reached (retryable: exit code 75)."""


@dataclass
class ImageRef:
    """One image: a local file, or bytes in memory; ``key`` identifies it (URI or sha256 of the bytes)."""

    key: str
    path: Path | None = None
    data: bytes | None = None
    decoded: Image.Image | None = None

    def open(self) -> Image.Image:
        if self.decoded is not None:
            return self.decoded
        if self.data is not None:
            source: Any = io.BytesIO(self.data)
        elif self.path is not None:
            source = self.path
        else:  # pragma: no cover - constructed with one of them
            raise ValueError(f"{self.key}: no image source")
        with Image.open(source) as image:
            return image.convert("RGB")


@dataclass
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


class Fetcher:
    """Reads bytes from s3://, http(s)://, file:// or local paths; remote files are cached on disk."""

    def __init__(self, cache_dir: Path, output: OutputSpec | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        self.cache_dir = cache_dir
        self.output = output
        self.timeout = timeout
        # An unreachable source is retried with the store's backoff for spec.output.retrySeconds, so an S3 or
        # HTTP outage while the data loads is ridden out in-process, as during checkpoints and uploads.
        self.retry = retry or (RetryPolicy.for_window(output.retry_seconds) if output else RetryPolicy())
        self._s3: Any = None
        self._keys = KeyLocks()

    def _s3_client(self) -> Any:
        if self._s3 is None:
            if self.output is None or not self.output.endpoint:
                raise DataError("data", None, "s3:// data needs spec.output.endpoint")
            self._s3 = minio_client(self.output.endpoint, self.output.region)
        return self._s3

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; FileNotFoundError when it does not exist, FetchUnavailable when it stayed
        unreachable for the whole retry window."""

        def unavailable(error: Exception, tries: int) -> FetchUnavailable:
            return FetchUnavailable(f"{error} (unreachable after {tries} {'try' if tries == 1 else 'tries'})")

        return self.retry.run(lambda: self._read_once(uri), what=uri, transient=FetchUnavailable,
                              give_up=unavailable, log=log, label="fetch", describe=str)

    def _read_once(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            from minio.error import S3Error
            from urllib3.exceptions import HTTPError

            bucket, key = parse_s3_uri(uri)
            try:
                response = self._s3_client().get_object(bucket, key)
                try:
                    return bytes(response.read())
                finally:
                    response.close()
                    response.release_conn()
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
        """A local file holding ``uri`` (downloaded into the cache for remote URIs).

        One download per URI and cache directory, however many threads of this process and processes (DDP ranks,
        loader workers) ask at once: the losers wait for the winner and reuse its file. The file only ever appears
        complete, under its final name, by an atomic rename.
        """
        if not uri.startswith(("s3://", "http://", "https://")):
            path = Path(uri.removeprefix("file://"))
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            return path
        suffix = Path(urllib.parse.urlparse(uri).path).suffix[:10]
        name = hashlib.sha256(uri.encode()).hexdigest()[:32]
        target = self.cache_dir / (name + suffix)
        if target.is_file():  # the common case once loaded: no lock, no lock file
            return target
        with self._keys.hold(name):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(self.cache_dir / f"{name}.lock"):
                if not target.is_file():  # another thread or process may have fetched it while this one waited
                    write_atomically(target, self.read(uri), prefix=name)
        return target


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


def check_image(image: ImageRef) -> tuple[Image.Image, int]:
    """Decode the image fully (a truncated or non-image file raises); returns it and its RGB byte size."""
    if image.data is not None:
        source: Any = io.BytesIO(image.data)
    else:
        source = image.path
    with Image.open(source) as raw:
        raw.load()
        rgb = raw.convert("RGB")
    return rgb, rgb.width * rgb.height * 3


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if urllib.parse.urlparse(uri).path.lower().endswith((".csv", ".tsv")) else "doclist"


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
class _Row:
    row: int
    text: str
    uri: str | None
    data: bytes | None
    error: str | None = None


def load_set(set_name: str, uri: str, data_spec: DataSpec, fetcher: Fetcher, workers: int = 8,
             cache_budget: list[int] | None = None) -> PairSet:
    """Load and validate one set of pairs. ``cache_budget`` is a shared [bytes left] for decoded images."""
    try:
        raw = fetcher.read(uri)
    except FileNotFoundError:
        raise DataError(set_name, None, f"{uri} does not exist") from None
    fmt = detect_format(uri, data_spec.format)
    rows: list[_Row] = []
    if fmt == "csv":
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(set_name, None, f"{uri} is not UTF-8 text") from None
        for i, caption, image in read_csv_rows(text, set_name, data_spec.text_column, data_spec.image_column):
            rows.append(_Row(i, caption, resolve_uri(image, uri) if image.strip() else None, None))
    else:
        for i, doc in enumerate(read_doclist(raw, set_name), 1):
            caption = _first(doc, (data_spec.text_column, *DOCLIST_TEXT_FIELDS))
            try:
                image_uri, image_bytes = _doc_image(doc, data_spec.image_column, uri)
            except ValueError as exc:
                rows.append(_Row(i, str(caption or ""), None, None, error=str(exc)))
                continue
            rows.append(_Row(i, str(caption) if caption is not None else "", image_uri, image_bytes))
    budget = cache_budget if cache_budget is not None else [DEFAULT_CACHE_BYTES]

    def check(row: _Row) -> Pair | str:
        if row.error is not None:
            return row.error
        if not row.text.strip():
            return "empty text"
        if row.uri is None and row.data is None:
            return "no image"
        try:
            if row.data is not None:
                ref = ImageRef(key="sha256:" + hashlib.sha256(row.data).hexdigest(), data=row.data)
            else:
                assert row.uri is not None
                ref = ImageRef(key=row.uri, path=fetcher.local_path(row.uri))
            decoded, size = check_image(ref)
        except FileNotFoundError:
            return f"image {row.uri} not found"
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            what = row.uri or "bytes"
            return f"image {what} is unreadable ({type(exc).__name__}: {str(exc)[:120]})"
        if budget[0] >= size:
            budget[0] -= size
            ref.decoded = decoded
        return Pair(text=row.text, image=ref, row=row.row)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(check, rows))
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
    if not out.pairs:
        raise DataError(set_name, None, f"{uri} holds no usable pairs")
    return out


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

    train = get("train", data_spec.train)
    val: PairSet | None = None
    if data_spec.eval:
        val = get("eval", data_spec.eval)
    elif data_spec.val_split > 0:
        train, val = split(train, data_spec.val_split, seed)
    query = get("query", data_spec.query) if data_spec.query else val
    index = get("index", data_spec.index) if data_spec.index else query
    reference = get("reference", data_spec.reference) if data_spec.reference else None
    zero_shot = get("zeroShot", data_spec.zero_shot) if data_spec.zero_shot else None
    return Datasets(train=train, val=val, query=query, index=index, reference=reference, zero_shot=zero_shot)
