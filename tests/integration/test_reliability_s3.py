"""S3 outages against a real S3 server (a private SeaweedFS this module starts, so the shared one is never
disturbed), through a TCP proxy the test controls: the trainer's store (``kubetune.storage.S3Store``, the same
code the trainer and the SDK use) rides out an outage shorter than its backoff window, gives up with
``StoreUnavailable`` (the trainer's retryable exit 75) after a longer one, and a permanently bad configuration
(a missing bucket, refused credentials) fails at once with a clear, non-retryable reason."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.storage import RetryPolicy, StoreError, StoreUnavailable, s3_store

from tests.cluster.s3 import S3Server, private_s3
from tests.faults import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with private_s3(tmp_path_factory.mktemp("seaweedfs"), "reliability-access",
                    "reliability-secret-never-logged") as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    name = f"kt-{uuid.uuid4().hex[:12]}"
    s3_store(s3_server.host_endpoint, name, env=_env(s3_server)).client.make_bucket(name)
    return name


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[TcpProxy]:
    host, port = s3_server.host_endpoint.removeprefix("http://").rsplit(":", 1)
    p = TcpProxy(host, int(port))
    yield p
    p.close()


def _env(s3_server: S3Server) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}


def test_outage_shorter_than_the_backoff_window_is_ridden_out(proxy: TcpProxy, s3_server: S3Server,
                                                              s3_bucket: str, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    store = s3_store(proxy.endpoint, f"s3://{s3_bucket}/kubetune/ns/run", env=_env(s3_server))  # default policy
    blob = tmp_path / "step-00000004.pt"
    blob.write_bytes(os.urandom(4 << 20))
    store.put_bytes("checkpoints/latest.json", b"{}")  # connection pool warm
    outage = proxy.outage_on(r"^PUT \S*/checkpoints/step-", 3.0)  # cut the checkpoint's own upload
    started = time.monotonic()
    store.put_file("checkpoints/step-00000004.pt", blob)  # a checkpoint written during the outage
    store.get_file("checkpoints/step-00000004.pt", tmp_path / "back.pt")
    elapsed = time.monotonic() - started
    assert outage.trigger and outage.trigger.startswith(f"PUT /{s3_bucket}/kubetune/ns/run/checkpoints/step-"), \
        outage.trigger
    assert outage.done.is_set() and proxy.refused > 0
    assert hashlib.sha256((tmp_path / "back.pt").read_bytes()).digest() == hashlib.sha256(blob.read_bytes()).digest()
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert retries, "the outage went unnoticed"
    assert 3.0 <= elapsed < 10.0, elapsed
    for record in caplog.records:
        assert s3_server.secret_key not in record.getMessage()
    print(f"\n3 s outage: checkpoint written after {elapsed:.1f}s, {len(retries)} retries")


def test_longer_outage_gives_up_as_retryable(proxy: TcpProxy, s3_server: S3Server, s3_bucket: str) -> None:
    # The default policy retries for ≈ 2 min (a 30 s outage is ridden out: tests/e2e/test_reliability_s3_outage.py);
    # the same backoff sized to 7.5 s by spec.output.retrySeconds gives up after it, with the retryable error.
    retry = RetryPolicy.for_window(7.5)
    store = s3_store(proxy.endpoint, f"s3://{s3_bucket}/x", env=_env(s3_server), retry=retry)
    window = retry.window
    proxy.down()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable after 5 attempts") as info:
        store.put_bytes("artifact/manifest.json", b"{}")
    elapsed = time.monotonic() - started
    assert window <= elapsed < window + 10, (elapsed, window)
    assert s3_server.secret_key not in str(info.value)
    # Back up: the same store works again (the trainer's next attempt resumes from its checkpoint).
    proxy.up()
    store.put_bytes("artifact/manifest.json", b"{}")
    assert store.get_bytes("artifact/manifest.json") == b"{}"
    print(f"\npermanent outage: StoreUnavailable after {elapsed:.1f}s (backoff window {window:.1f}s)")


def test_a_missing_bucket_fails_at_once_and_is_never_created(s3_server: S3Server) -> None:
    slept: list[float] = []
    store = s3_store(s3_server.host_endpoint, "s3://kt-no-such-bucket/x", env=_env(s3_server),
                     retry=RetryPolicy(sleep=slept.append))  # the default window: ≈ 2 min of retries
    with pytest.raises(StoreError, match=r"NoSuchBucket: the bucket 'kt-no-such-bucket' does not exist") as info:
        store.check()  # what the trainer does first
    assert not isinstance(info.value, StoreUnavailable)
    # A write does not create it either (SeaweedFS would, for an admin, unless told not to; MinIO and AWS refuse)
    with pytest.raises(StoreError, match=r"put s3://kt-no-such-bucket/x/a\.json: NoSuchBucket"):
        store.put_bytes("a.json", b"{}")
    assert not store.client.bucket_exists("kt-no-such-bucket")
    assert slept == []


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_refused_credentials_fail_at_once_naming_the_credentials(s3_server: S3Server, s3_bucket: str,
                                                                  wrong: str) -> None:
    env = _env(s3_server)
    env["AWS_SECRET_ACCESS_KEY" if wrong == "secret" else "AWS_ACCESS_KEY_ID"] = "wrong-value-not-logged"
    slept: list[float] = []
    store = s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/x", env=env, retry=RetryPolicy(sleep=slept.append))
    started = time.monotonic()
    with pytest.raises(StoreError) as at_check:
        store.check()
    with pytest.raises(StoreError) as at_write:
        store.put_bytes("a.json", b"{}")
    elapsed = time.monotonic() - started
    # a HEAD (the bucket check) has no error body: the code alone says "access denied"
    assert "AccessDenied" in str(at_check.value)
    code = "SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId"
    assert f"put s3://{s3_bucket}/x/a.json: {code}" in str(at_write.value)
    for error in (at_check.value, at_write.value):
        assert not isinstance(error, StoreUnavailable), error
        assert "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(error)
        assert "wrong-value-not-logged" not in str(error) and s3_server.secret_key not in str(error)
    assert slept == [] and elapsed < 5, (slept, elapsed)
    assert not s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/x", env=_env(s3_server)).exists("a.json")


def test_a_data_read_with_refused_credentials_fails_at_once(s3_server: S3Server, s3_bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A refusal is not an outage: the trainer fails with StorageRejected instead of retrying for retrySeconds.
    from kubetune.api.spec import OutputSpec
    from kubetune_trainer.data import Fetcher

    s3_store(s3_server.host_endpoint, s3_bucket, env=_env(s3_server)).put_bytes("data/0001.png", b"png")
    for key, value in _env(s3_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-value-not-logged")
    fetcher = Fetcher(tmp_path / "cache", OutputSpec(endpoint=s3_server.host_endpoint, retry_seconds=60))
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        fetcher.read(f"s3://{s3_bucket}/data/0001.png")
    assert time.monotonic() - started < 5
    assert "SignatureDoesNotMatch" in str(refused.value) and "check the credentials" in str(refused.value)
    assert "wrong-value-not-logged" not in str(refused.value)


def test_data_read_during_an_outage_is_ridden_out(proxy: TcpProxy, s3_server: S3Server, s3_bucket: str,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The trainer's data reads (CSV, images, weights files: kubetune_trainer.data.Fetcher) retry like its store
    # for spec.output.retrySeconds, so an outage while the data loads costs seconds, not a trainer attempt.
    from kubetune.api.spec import OutputSpec
    from kubetune_trainer.data import Fetcher, FetchUnavailable

    for key, value in _env(s3_server).items():
        monkeypatch.setenv(key, value)
    image = os.urandom(64 << 10)
    s3_store(proxy.endpoint, s3_bucket, env=_env(s3_server)).put_bytes("data/0001.png", image)
    fetcher = Fetcher(tmp_path / "cache", OutputSpec(endpoint=proxy.endpoint, retry_seconds=30))
    outage = proxy.outage_on(r"^GET \S*/data/0001\.png", 3.0)
    started = time.monotonic()
    assert fetcher.read(f"s3://{s3_bucket}/data/0001.png") == image
    elapsed = time.monotonic() - started
    assert outage.done.is_set() and proxy.refused > 0
    assert any("succeeded on try" in r.getMessage() for r in caplog.records), "the outage went unnoticed"
    assert 3.0 <= elapsed < 15.0, elapsed
    with pytest.raises(FileNotFoundError):  # a missing object is no outage: no retry
        fetcher.read(f"s3://{s3_bucket}/data/missing.png")
    # With retrySeconds 0 the outage is the trainer's retryable exit at once.
    proxy.down()
    with pytest.raises(FetchUnavailable, match=r"unreachable after 1 try\)"):
        Fetcher(tmp_path / "cache0", OutputSpec(endpoint=proxy.endpoint, retry_seconds=0)).read(
            f"s3://{s3_bucket}/data/0001.png")
    proxy.up()
    for record in caplog.records:
        assert s3_server.secret_key not in record.getMessage()
    print(f"\n3 s outage during a data read: read after {elapsed:.1f}s")
