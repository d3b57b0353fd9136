"""Finetuner's ``Document`` and ``DocumentArray`` (docarray v1's shape) in plain Python, and their conversion into
the training files :func:`kubetune.fit` uploads.

    from kubetune import Document, DocumentArray

    train = DocumentArray([
        Document(chunks=[Document(uri="shirt-1.jpg", modality="image"),            # Finetuner's CLIP shape
                         Document(text="a striped over-sized shirt", modality="text")]),
        Document(text="a black pencil skirt", uri="https://example.com/skirt.jpg"),   # flat: text and image
    ])
    run = kubetune.fit(model="clip-base-en", train_data=train, epochs=5)

A document holds ``text``; an image as ``uri`` (a path, file://, http(s)://, s3:// or data: URI), ``blob``
(encoded bytes) or ``tensor`` (an H×W×C or C×H×W array); ``chunks``, ``tags``, and, after
:func:`kubetune.encode`, an ``embedding``. For training, each document gives one (text, image) row per text it
holds — its own and its chunks' — with exactly one image among them.

What ``fit`` uploads is a CSV (``text``, ``image`` columns) with the in-memory images written beside it, one file
per distinct image, not a docarray v2 DocList: the SDK's extra has no docarray (a laptop needs only this module,
plus Pillow for tensors); an image shared by several captions is stored and uploaded once instead of once per row;
local image files go up through the same upload as any CSV's. The trainer reads CSV rows and DocList documents
into the same (text, image) pairs with the same checks, so nothing is lost: row order, texts (quoted as CSV
needs) and image bytes are kept as they are.

numpy and Pillow are imported on first use; docarray never.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import urllib.parse
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubetune.api.errors import ConfigInvalid

TEXT = "text"
IMAGE = "image"
LABEL_TAG = "finetuner_label"  # Finetuner's class label key: relevance of its labelled evaluation sets
REMOTE_PREFIXES = ("s3://", "http://", "https://")
TRAINING_SHAPE = ("a training document is a parent with an image chunk (uri, blob or tensor) and a text chunk, "
                  "or one document with both text and an image")
_FIELDS = ("id", "text", "uri", "blob", "tensor", "embedding", "chunks", "tags", "modality", "mime_type")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
          (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
NO_CLOUD_HINT = ("pass a CSV path (text,image columns), an s3:// URI to one, or a DocumentArray built locally "
                 "(see docs/finetuner.md)")


class Document:
    """One document: ``text``, an image (``uri`` / ``blob`` / ``tensor``), ``chunks``, ``tags``, ``embedding``.

    ``content`` sets ``text`` (a str), ``blob`` (bytes) or ``tensor`` (an array), as in docarray v1.
    """

    def __init__(self, content: Any = None, *, id: str | None = None, text: str | None = None,
                 uri: str | os.PathLike[str] | None = None, blob: bytes | None = None, tensor: Any = None,
                 embedding: Any = None, chunks: Iterable[Document] | None = None, tags: dict[str, Any] | None = None,
                 modality: str | None = None, mime_type: str | None = None, **unknown: Any) -> None:
        if unknown:
            raise ConfigInvalid(f"Document: unsupported field(s) {', '.join(sorted(unknown))}",
                                f"kubetune's Document has {', '.join(_FIELDS)}")
        if text is not None and not isinstance(text, str):
            raise ConfigInvalid(f"Document(text=...): expected a str, got {type(text).__name__}")
        if blob is not None and not isinstance(blob, bytes | bytearray):
            raise ConfigInvalid(f"Document(blob=...): expected bytes, got {type(blob).__name__}",
                                "an array goes into tensor=")
        self.id = id or uuid.uuid4().hex
        self.text = text
        self.uri = os.fspath(uri) if uri is not None else None
        self.blob = blob if isinstance(blob, bytes) or blob is None else bytes(blob)
        self.tensor = tensor
        self.embedding = embedding
        self.chunks = DocumentArray(chunks or [])
        self.tags: dict[str, Any] = dict(tags or {})
        self.modality = modality
        self.mime_type = mime_type
        if content is not None:
            self.content = content

    @property
    def content(self) -> Any:
        """The text, else the blob, else the tensor."""
        return next((v for v in (self.text, self.blob, self.tensor) if v is not None), None)

    @content.setter
    def content(self, value: Any) -> None:
        if isinstance(value, str):
            self.text = value
        elif isinstance(value, bytes | bytearray):
            self.blob = bytes(value)
        elif hasattr(value, "shape"):
            self.tensor = value
        else:
            raise ConfigInvalid(f"Document(content=...): expected a str, bytes or an array, got {type(value).__name__}")

    def load_uri_to_blob(self, *args: Any, **kwargs: Any) -> Document:
        """Read the image at ``uri`` into ``blob`` (so that it is sent by value, not by reference); docarray's
        arguments (``timeout``...) are accepted and ignored."""
        if not self.uri:
            raise ConfigInvalid(f"Document {self.id}: no uri to load")
        self.blob = read_uri(self.uri)
        return self

    convert_uri_to_blob = load_uri_to_blob  # docarray v1's older name, used in Finetuner's guides

    def summary(self) -> None:
        print(repr(self))
        for i, chunk in enumerate(self.chunks):
            print(f"  chunk {i}: {chunk!r}")

    def __repr__(self) -> str:
        parts = []
        if self.text is not None:
            parts.append(f"text={self.text[:40] + ('…' if len(self.text) > 40 else '')!r}")
        if self.uri is not None:
            parts.append(f"uri={self.uri[:60]!r}")
        if self.blob is not None:
            parts.append(f"blob=<{len(self.blob)} bytes>")
        for name in ("tensor", "embedding"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}=<{getattr(value, 'shape', '?')}>")
        if self.chunks:
            parts.append(f"chunks=<{len(self.chunks)}>")
        for name in ("modality", "tags"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)!r}")
        return f"Document({', '.join(parts)})"


class DocumentArray(list[Document]):
    """A list of :class:`Document` with docarray v1's bulk attributes (``embeddings``, ``texts``, ``uris``)."""

    def __init__(self, docs: Iterable[Document] | Document | None = None) -> None:
        items = [docs] if isinstance(docs, Document) else list(docs or [])
        for i, doc in enumerate(items):
            if not isinstance(doc, Document):
                raise ConfigInvalid(f"DocumentArray[{i}]: expected a Document, got {type(doc).__name__}")
        super().__init__(items)

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return DocumentArray(item) if isinstance(index, slice) else item

    @property
    def embeddings(self) -> Any:
        """The documents' embeddings stacked into an (N, D) numpy array; None when none has one."""
        missing = [i for i, doc in enumerate(self) if doc.embedding is None]
        if len(missing) == len(self):
            return None
        if missing:
            raise ConfigInvalid(f"document {missing[0]} has no embedding while others have",
                                "encode the whole DocumentArray: kubetune.encode(model, data=docs)")
        import numpy as np

        return np.stack([np.asarray(doc.embedding) for doc in self])

    @embeddings.setter
    def embeddings(self, value: Any) -> None:
        rows = list(value)
        if len(rows) != len(self):
            raise ConfigInvalid(f"{len(rows)} embeddings for {len(self)} documents")
        for doc, row in zip(self, rows, strict=True):
            doc.embedding = row

    @property
    def texts(self) -> list[str | None]:
        return [doc.text for doc in self]

    @texts.setter
    def texts(self, value: Iterable[str]) -> None:
        values = list(value)
        if len(values) != len(self):
            raise ConfigInvalid(f"{len(values)} texts for {len(self)} documents")
        for doc, text in zip(self, values, strict=True):
            doc.text = text

    @property
    def uris(self) -> list[str | None]:
        return [doc.uri for doc in self]

    @classmethod
    def pull(cls, name: str, *args: Any, **kwargs: Any) -> DocumentArray:
        """Finetuner pulled named data sets from Jina AI Cloud; kubetune has no such cloud."""
        raise ConfigInvalid(f"DocumentArray.pull({name!r}): Jina AI Cloud is not available to kubetune, so its data "
                            "sets cannot be pulled", NO_CLOUD_HINT)

    def push(self, name: str, *args: Any, **kwargs: Any) -> None:
        raise ConfigInvalid(f"DocumentArray.push({name!r}): Jina AI Cloud is not available to kubetune",
                            "pass the DocumentArray itself to kubetune.fit: it is uploaded to the cluster's S3")

    def summary(self) -> None:
        counts = {"text": 0, "image": 0, "chunks": 0, "embedding": 0}
        for doc in self:
            texts, images = _contents(doc)
            counts["text"] += bool(texts)
            counts["image"] += bool(images)
            counts["chunks"] += bool(doc.chunks)
            counts["embedding"] += doc.embedding is not None
        print(f"DocumentArray of {len(self)} documents: " + ", ".join(f"{n} with {k}" for k, n in counts.items()))


def is_documents(data: Any) -> bool:
    return isinstance(data, DocumentArray | Document)


# ---------------------------------------------------------------------------------------------- reading images
def read_uri(uri: str) -> bytes:
    """The bytes at a path, file://, http(s)://, s3:// or data: URI (:class:`ConfigInvalid` when absent,
    :class:`~kubetune.api.errors.StorageUnavailable` when its host cannot be reached)."""
    if uri.startswith("data:"):
        header, _, payload = uri.partition(",")
        try:
            return base64.b64decode(payload, validate=True) if header.endswith(";base64") else (
                urllib.parse.unquote_to_bytes(payload))
        except ValueError:
            raise ConfigInvalid(f"{uri[:40]}…: a malformed data: URI", "data:image/png;base64,<base64>") from None
    if uri.startswith(REMOTE_PREFIXES):
        from kubetune.sdk.models import _fetch

        return _fetch(uri)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigInvalid(f"{path}: no such image file")
    return path.read_bytes()


def _image_suffix(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), None)


# ---------------------------------------------------------------------------------------------- training rows
def _has_image(doc: Document) -> bool:
    return doc.modality != TEXT and (doc.blob is not None or doc.tensor is not None or bool(doc.uri))


def _text(doc: Document) -> str | None:
    return doc.text if doc.modality != IMAGE and isinstance(doc.text, str) and doc.text.strip() else None


def _contents(doc: Document) -> tuple[list[str], list[Document]]:
    """The texts and the image documents of a document and its chunks."""
    parts = [doc, *doc.chunks]
    return [t for t in map(_text, parts) if t is not None], [p for p in parts if _has_image(p)]


def training_rows(docs: DocumentArray, set_name: str) -> list[tuple[int, str, Document]]:
    """(document index, text, image document) rows, one per text; :class:`ConfigInvalid` names a bad document."""
    rows: list[tuple[int, str, Document]] = []
    for i, doc in enumerate(docs):
        texts, images = _contents(doc)
        where = f"{set_name}_data[{i}]"
        if not texts:
            raise ConfigInvalid(f"{where}: no text", TRAINING_SHAPE)
        if not images:
            raise ConfigInvalid(f"{where}: no image (uri, blob or tensor)", TRAINING_SHAPE)
        if len(images) > 1:
            raise ConfigInvalid(f"{where}: {len(images)} images; each document pairs its texts with one image",
                                "make one document per image (several texts per image are fine)")
        rows.extend((i, text, images[0]) for text in texts)
    if not rows:
        raise ConfigInvalid(f"{set_name}_data: the DocumentArray is empty")
    return rows


def write_pairs_csv(docs: DocumentArray, folder: Path, set_name: str, text_column: str = "text",
                    image_column: str = "image") -> Path:
    """Write ``docs`` as ``folder/<set_name>.csv`` with in-memory images under ``folder/images/`` (one file per
    distinct image); local image files are named by absolute path and remote URIs kept. Returns the CSV."""
    rows = training_rows(docs, set_name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{set_name}.csv"
    values: dict[tuple[int, int, str | None], str] = {}  # an image's fields (by identity) → its CSV value
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[text_column, image_column])
        writer.writeheader()
        for index, text, image in rows:
            key = (id(image.blob), id(image.tensor), image.uri)
            if key not in values:
                values[key] = _image_value(image, folder, f"{set_name}_data[{index}]")
            writer.writerow({text_column: text, image_column: values[key]})
    return path


def _image_value(doc: Document, folder: Path, where: str) -> str:
    """The CSV's image column for one image document (blob first, as docarray's load_uri_to_blob means)."""
    if doc.blob is not None:
        return _write_image(folder, doc.blob, where)
    if doc.tensor is not None:
        return _write_image(folder, _tensor_png(doc.tensor, where), where)
    uri = str(doc.uri)
    if uri.startswith("data:"):
        return _write_image(folder, read_uri(uri), where)
    if uri.startswith(REMOTE_PREFIXES):
        return uri
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if not path.is_file():
        raise ConfigInvalid(f"{where}: image {uri} not found ({path})", "relative paths are relative to the "
                            "current directory")
    return str(path)


def _write_image(folder: Path, data: bytes, where: str) -> str:
    suffix = _image_suffix(data)
    if suffix is None:
        raise ConfigInvalid(f"{where}: the image bytes are not a PNG, JPEG, GIF, WebP, BMP or TIFF file",
                            "blob holds an encoded image file (doc.load_uri_to_blob()); an array goes in tensor")
    name = hashlib.sha256(data).hexdigest()[:32] + suffix
    target = folder / "images" / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return f"images/{name}"


def _tensor_png(tensor: Any, where: str) -> bytes:
    import io

    from kubetune.sdk.models import _open_image, _require

    _require("PIL", "trainer", "writing image tensors as files")
    try:
        image = _open_image(tensor)
    except (TypeError, ValueError) as exc:
        raise ConfigInvalid(f"{where}: tensor of shape {tuple(getattr(tensor, 'shape', ()))} is not an image "
                            f"({exc})", "an image tensor is H×W×C or C×H×W, uint8 or float in [0, 1]") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- labelled evaluation
def _label(doc: Document) -> Any:
    return doc.tags.get(LABEL_TAG)


def _is_labelled_queries(docs: Any) -> bool:
    return (isinstance(docs, DocumentArray) and len(docs) > 0
            and all(_text(d) is not None and not _has_image(d) and _label(d) is not None for d in docs))


def labelled_pairs(query: Any, index: Any) -> tuple[Any, Any]:
    """Finetuner's labelled evaluation sets — text queries and image index documents sharing
    ``tags['finetuner_label']`` — as kubetune's (text, image) pair sets; any other data is returned unchanged.

    kubetune counts an index image relevant to a query when it is paired with the query's text, so each index
    image is paired with every query text of its label (an image whose label no query has keeps the label as
    its text, and stays a distractor), and each query with one image of its label.
    """
    if not _is_labelled_queries(query):
        return query, index
    if not isinstance(index, DocumentArray):
        raise ConfigInvalid("query_data holds labelled texts (tags['finetuner_label']): index_data must be a "
                            "DocumentArray of labelled images", "or give both sets as (text, image) pairs")
    texts: dict[Any, list[str]] = {}
    for doc in query:
        group = texts.setdefault(_label(doc), [])
        if doc.text not in group:
            group.append(str(doc.text))
    images: dict[Any, list[Document]] = {}
    for j, doc in enumerate(index):
        if not _has_image(doc) or _label(doc) is None:
            raise ConfigInvalid(f"index_data[{j}]: an index document needs an image and tags['{LABEL_TAG}'] (the "
                                "query set is labelled)")
        images.setdefault(_label(doc), []).append(doc)
    queries = DocumentArray()
    for i, doc in enumerate(query):
        relevant = images.get(_label(doc))
        if not relevant:
            raise ConfigInvalid(f"query_data[{i}]: no index_data image has {LABEL_TAG} {_label(doc)!r}",
                                "every query needs at least one relevant image in the index")
        queries.append(_pair(str(doc.text), relevant[0]))
    pairs = DocumentArray(_pair(text, doc) for doc in index for text in texts.get(_label(doc)) or [str(_label(doc))])
    return queries, pairs


def _pair(text: str, image: Document) -> Document:
    """A flat (text, image) document sharing ``image``'s blob/tensor objects (so the image is written once)."""
    return Document(text=text, uri=image.uri, blob=image.blob, tensor=image.tensor, tags=dict(image.tags))
