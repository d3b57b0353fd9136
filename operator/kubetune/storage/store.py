"""One small object-store abstraction: a local directory or an S3/MinIO bucket, under a key prefix.

The trainer writes checkpoints and artifacts through it, the SDK downloads artifacts through it, and tests
run it against a real S3 HTTP server. No torch here (the operator image imports this package).

A run's keys, relative to its store (see :func:`run_store`)::

    checkpoints/latest.json, checkpoints/step-000123.pt, ...
    artifact/manifest.json, artifact/clip-text/..., artifact/clip-vision/...

Connection problems are retried with exponential backoff (:class:`~kubetune.storage.retry.RetryPolicy`) and end
in :class:`StoreUnavailable`, which the trainer maps to a retryable exit code. Credentials come from the
environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and are never logged, printed or put into an
exception or ``repr``.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

from .retry import RetryPolicy

if TYPE_CHECKING:
    from minio import Minio

    from kubetune.api.spec import OutputSpec

# the package's name, not this module's: the trainer's log lines show it, and a log filter selects the store by it
log = logging.getLogger("kubetune.storage")
T = TypeVar("T")

ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
CHECKPOINTS = "checkpoints"
ARTIFACT = "artifact"
_TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                                 "RequestTimeTooSkewed", "OperationAborted"})
# A refusal of who is asking, not of what is asked: the message says where the credentials come from. (A HEAD
# has no error body, so a bad secret on bucket_exists/stat reads as a bare "AccessDenied: Access denied".)
_CREDENTIAL_S3_CODES = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"})
_CREDENTIAL_HINT = (f"check the credentials ({ACCESS_KEY_ENV}/{SECRET_KEY_ENV}, from spec.output.credentialsSecret "
                    "on a cluster) and their access to the bucket")


class StoreError(Exception):
    """A store operation failed for a reason that retrying will not fix (permission, bad bucket...)."""


class StoreUnavailable(StoreError):
    """The store could not be reached after all retries: retryable at the process level."""


class ObjectNotFound(StoreError):
    """The key does not exist."""


def refusal(what: str, code: str | None, message: str | None) -> StoreError | None:
    """The error an S3 error ``code`` on ``what`` means, or None when the code is a transient server-side one worth
    retrying. A missing key is :class:`ObjectNotFound`; a refused credential says where credentials come from."""
    if code in ("NoSuchKey", "NoSuchObject"):
        return ObjectNotFound(what)
    if code in _CREDENTIAL_S3_CODES:
        return StoreError(f"{what}: {code}: {message} ({_CREDENTIAL_HINT})")
    if code not in _TRANSIENT_S3_CODES:
        return StoreError(f"{what}: {code}: {message}")
    return None


def _clean_key(key: str) -> str:
    parts = [p for p in PurePosixPath(key.replace("\\", "/")).parts if p not in ("", "/", ".")]
    if any(p == ".." for p in parts):
        raise StoreError(f"key must not contain '..': {key!r}")
    return "/".join(parts)


def _nonempty_prefix(prefix: str) -> str:
    clean = _clean_key(prefix)
    if not clean:
        raise StoreError("refusing to delete every key of the store: name a prefix")
    return clean


def join_key(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts and duplicate slashes."""
    return "/".join(p for p in (_clean_key(part) for part in parts) if p)


class Store(ABC):
    """Keys are '/'-separated paths relative to the store's root (a directory or a bucket prefix)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where ``key`` lives: a local path or an ``s3://bucket/key`` URI."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Download ``key`` to ``path`` (parents created); :class:`ObjectNotFound` when absent."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted, relative to the store root."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix/`` (recursive); returns how many there were. A key named ``prefix``
        itself is kept, as are keys that merely start with it (``prefix2/...``). An empty prefix is refused with
        :class:`StoreError`: it would empty the whole store."""

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """The same backend rooted at ``prefix`` below this store's root."""

    def check(self) -> None:
        """Fail fast on a configuration that can never work (a bucket that does not exist, refused credentials):
        :class:`StoreError`; :class:`StoreUnavailable` when unreachable after the retries. Nothing to check here
        for a local directory (it is created on the first write)."""
        return None

    def put_dir(self, prefix: str, directory: str | os.PathLike[str]) -> builtins.list[str]:
        """Upload every file under ``directory`` to ``prefix/<relative path>``; returns the keys."""
        root = Path(directory)
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = join_key(prefix, path.relative_to(root).as_posix())
            self.put_file(key, path)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, directory: str | os.PathLike[str]) -> builtins.list[Path]:
        """Download every key under ``prefix`` into ``directory``, keeping relative paths."""
        prefix = _clean_key(prefix)
        out = []
        for key in self.list(prefix):
            rel = key[len(prefix):].lstrip("/") if prefix else key
            target = Path(directory) / rel
            self.get_file(key, target)
            out.append(target)
        return out


class LocalStore(Store):
    """A directory on the local filesystem (local mode, tests, a mounted volume)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def uri(self, key: str = "") -> str:
        return str(self._path(key))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)  # atomic: a reader never sees half a checkpoint

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(self.uri(key))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != Path(path).resolve():
            shutil.copyfile(source, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(self.uri(key))
        return source.read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [_clean_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".tmp"))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(_nonempty_prefix(prefix))
        if not base.is_dir():
            return 0
        count = sum(1 for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        shutil.rmtree(base)
        return count

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))


class S3Store(Store):
    """A bucket prefix on S3/MinIO through the ``minio`` client, with retry and backoff."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "", retry: RetryPolicy | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = _clean_key(prefix)
        self.retry = retry or RetryPolicy()

    def __repr__(self) -> str:  # never the credentials
        return f"S3Store({self.uri()!r})"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def uri(self, key: str = "") -> str:
        path = self._key(key)
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from minio.error import S3Error, ServerError
        from urllib3.exceptions import HTTPError

        # S3 answers a missing key or a refusal with an S3Error too: only its server-side codes are worth retrying
        def once() -> T:
            try:
                return fn()
            except S3Error as exc:
                error = refusal(what, exc.code, exc.message)
                if error is not None:
                    raise error from None
                raise

        def unavailable(error: Exception, tries: int) -> StoreUnavailable:
            return StoreUnavailable(f"{what}: unreachable after {tries} attempts "
                                    f"({type(error).__name__}: {str(error)[:200]})")

        return self.retry.run(once, what=what, transient=(S3Error, ServerError, HTTPError, OSError),
                              give_up=unavailable, log=log, label="store")

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        self._call(f"put {self.uri(key)}", lambda: self.client.fput_object(self.bucket, self._key(key), str(path)))

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call(f"get {self.uri(key)}", lambda: self.client.fget_object(self.bucket, self._key(key), str(path)))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {self.uri(key)}", lambda: self.client.put_object(
            self.bucket, self._key(key), io.BytesIO(data), len(data)))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {self.uri(key)}", read)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        # a trailing '/' so that prefix "ckpt" does not match "ckpt2/..."
        query = f"{full}/" if full else ""
        names = self._call(f"list {self.uri(prefix)}", lambda: [
            o.object_name for o in self.client.list_objects(self.bucket, prefix=query, recursive=True)])
        if _clean_key(prefix) and self.exists(prefix):
            names.append(full)
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted({str(n)[cut:] for n in names if n})

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {self.uri(key)}", lambda: self.client.stat_object(self.bucket, self._key(key)))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(f"delete {self.uri(key)}", lambda: self.client.remove_object(self.bucket, self._key(key)))

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        query = f"{self._key(_nonempty_prefix(prefix))}/"
        what = f"delete {self.uri(prefix)}/"

        # listed again on a retry: what a failed try removed is then simply no longer there
        def remove() -> int:
            names = [str(o.object_name) for o in self.client.list_objects(self.bucket, prefix=query, recursive=True)]
            failed = list(self.client.remove_objects(self.bucket, [DeleteObject(n) for n in names]))
            if failed:
                raise StoreError(f"{what}: {len(failed)} of {len(names)} keys not deleted, first "
                                 f"{failed[0].name}: {failed[0].code}: {failed[0].message}")
            return len(names)

        return self._call(what, remove)

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.client, self.bucket, self._key(prefix), self.retry)

    def check(self) -> None:
        # A HEAD of a key in a missing bucket reads as "no such key", so without this a run with a wrong bucket
        # would train until its first checkpoint before failing.
        if not self._call(f"check {self.uri()}", lambda: self.client.bucket_exists(self.bucket)):
            raise StoreError(f"{self.uri()}: NoSuchBucket: the bucket {self.bucket!r} does not exist")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, _clean_key(parsed.path)


def minio_client(endpoint: str, region: str = "us-east-1", env: Mapping[str, str] | None = None,
                 timeout_seconds: float = 20.0, connect_timeout_seconds: float = 5.0) -> Minio:
    """A client for ``endpoint`` (http(s)://host:port) with credentials from the environment.

    urllib3's own retries are turned off: :class:`S3Store` retries with backoff and reports the outcome. The
    timeouts are short (connect 5 s, each read 20 s) so that a blackholed endpoint or a connection that went
    silent costs one try, not minutes.
    """
    import urllib3
    from minio import Minio

    env = os.environ if env is None else env
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("the S3 endpoint must look like http(s)://host[:port]")
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=min(connect_timeout_seconds, timeout_seconds),
                                                             read=timeout_seconds),
                               retries=False, maxsize=16)
    return Minio(parsed.netloc, access_key=env.get(ACCESS_KEY_ENV) or None,
                 secret_key=env.get(SECRET_KEY_ENV) or None, secure=parsed.scheme == "https",
                 region=region, http_client=http)


def s3_store(endpoint: str, uri_or_bucket: str, region: str = "us-east-1", env: Mapping[str, str] | None = None,
             retry: RetryPolicy | None = None) -> S3Store:
    """An :class:`S3Store` for ``s3://bucket/prefix`` (or a bare bucket name) on ``endpoint``."""
    if uri_or_bucket.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri_or_bucket)
    else:
        bucket, prefix = uri_or_bucket, ""
    return S3Store(minio_client(endpoint, region, env), bucket, prefix, retry)


def store_from_uri(uri: str, endpoint: str | None = None, region: str = "us-east-1",
                   env: Mapping[str, str] | None = None, retry: RetryPolicy | None = None) -> Store:
    """An artifact/run URI (``s3://...`` or a local path/``file://``) as a store rooted there."""
    if uri.startswith("s3://"):
        env = os.environ if env is None else env
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if not endpoint:
            raise ValueError(f"{uri}: an S3 endpoint is needed (argument or AWS_ENDPOINT_URL_S3)")
        return s3_store(endpoint, uri, region, env, retry)
    return LocalStore(uri.removeprefix("file://"))


def run_key(prefix: str, namespace: str, name: str, uid: str | None = None) -> str:
    """``<prefix>/<namespace>/<name>/<uid>``: where one run's checkpoints and artifact live in the bucket. The uid
    keeps a run created again under a deleted run's name from resuming, or reporting, the deleted run's work,
    and from overwriting its artifact. Without a uid (a trainer started by hand): ``<prefix>/<namespace>/<name>``."""
    return join_key(prefix, namespace, name, *([uid] if uid else []))


def run_store(output: OutputSpec, namespace: str, name: str, output_dir: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None, retry: RetryPolicy | None = None,
              uid: str | None = None) -> Store:
    """The store rooted at one run: ``output_dir`` itself in local mode, else the bucket's run prefix."""
    if output_dir is not None:
        return LocalStore(output_dir)
    if not output.endpoint or not output.bucket:
        raise ValueError("spec.output.endpoint and spec.output.bucket are needed without a local output dir")
    retry = retry or RetryPolicy.for_window(output.retry_seconds)
    return s3_store(output.endpoint, output.bucket, output.region, env, retry).child(
        run_key(output.prefix, namespace, name, uid))
