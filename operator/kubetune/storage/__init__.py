"""Where runs keep their files, and how they are fetched: the object store, the retry policy every remote call
uses, and the artifact's manifest.

- :mod:`.store`: :class:`Store` (a local directory or an S3/MinIO bucket under a key prefix) and its helpers.
- :mod:`.retry`: :class:`RetryPolicy`, the backoff of the store and of the trainer's data fetcher.
- :mod:`.artifact`: the sha256 manifest (write, verify) and the SDK's verified download.

No torch here (the operator image imports this package).
"""

from __future__ import annotations

from .artifact import (
    FORMAT,
    MANIFEST,
    download_artifact,
    listed_files,
    mismatches,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from .retry import DEFAULT_RETRY_SECONDS, RetryPolicy
from .store import (
    ACCESS_KEY_ENV,
    ARTIFACT,
    CHECKPOINTS,
    SECRET_KEY_ENV,
    LocalStore,
    ObjectNotFound,
    S3Store,
    Store,
    StoreError,
    StoreUnavailable,
    join_key,
    minio_client,
    parse_s3_uri,
    refusal,
    run_key,
    run_store,
    s3_store,
    store_from_uri,
)

__all__ = [
    "ACCESS_KEY_ENV", "ARTIFACT", "CHECKPOINTS", "DEFAULT_RETRY_SECONDS", "FORMAT", "MANIFEST", "SECRET_KEY_ENV",
    "LocalStore", "ObjectNotFound", "RetryPolicy", "S3Store", "Store", "StoreError", "StoreUnavailable",
    "download_artifact", "join_key", "listed_files", "minio_client", "mismatches", "parse_s3_uri", "refusal",
    "run_key",
    "run_store", "s3_store", "sha256_file", "store_from_uri", "verify_manifest", "write_manifest",
]
