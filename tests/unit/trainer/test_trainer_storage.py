"""The local store backend and the S3 backend's retry behaviour (no server: a closed port)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from kubetune.api.spec import OutputSpec
from kubetune.storage import (
    LocalStore,
    ObjectNotFound,
    RetryPolicy,
    S3Store,
    StoreError,
    StoreUnavailable,
    join_key,
    parse_s3_uri,
    run_store,
    s3_store,
)

pytestmark = pytest.mark.unit


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("checkpoints/latest.json", b"{}")
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    store.put_file("artifact/clip-text/model.safetensors", source)
    assert store.exists("checkpoints/latest.json") and not store.exists("checkpoints/nope")
    assert store.list() == ["artifact/clip-text/model.safetensors", "checkpoints/latest.json"]
    assert store.list("artifact") == ["artifact/clip-text/model.safetensors"]
    store.get_file("artifact/clip-text/model.safetensors", tmp_path / "back" / "m")
    assert (tmp_path / "back" / "m").read_bytes() == b"x" * 1000
    assert store.child("artifact").list() == ["clip-text/model.safetensors"]
    assert [p.name for p in store.get_dir("artifact", tmp_path / "dl")] == ["model.safetensors"]
    store.delete("checkpoints/latest.json")
    store.delete("checkpoints/latest.json")  # idempotent
    with pytest.raises(ObjectNotFound):
        store.get_bytes("checkpoints/latest.json")
    with pytest.raises(StoreError, match=r"\.\."):
        store.put_bytes("../escape", b"")


def test_keys_and_uris() -> None:
    assert join_key("kubetune/", "/ns", "", "run/") == "kubetune/ns/run"
    assert parse_s3_uri("s3://bucket/a/b.csv") == ("bucket", "a/b.csv")
    with pytest.raises(ValueError):
        parse_s3_uri("http://bucket/a")
    assert run_store(OutputSpec(), "ns", "run", output_dir="/tmp/x").uri() == "/tmp/x"
    with pytest.raises(ValueError, match="endpoint"):
        run_store(OutputSpec(), "ns", "run")


def test_s3_unreachable_retries_with_backoff_then_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slept: list[float] = []
    secret = "s3cr3t-value-never-logged"
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": secret}
    store = s3_store(f"http://127.0.0.1:{port}", "s3://bucket/kubetune", env=env,
                     retry=RetryPolicy(attempts=4, base_delay=0.5, max_delay=1.0, sleep=slept.append)).child("ns/r")
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnavailable, match="unreachable after 4 attempts") as info:
        store.put_bytes("checkpoints/latest.json", b"{}")
    assert slept == [0.5, 1.0, 1.0]
    assert store.uri("x") == "s3://bucket/kubetune/ns/r/x"
    for text in (caplog.text, str(info.value), repr(store)):
        assert secret not in text


def test_default_backoff_rides_out_a_minute_long_outage_and_is_set_by_the_spec() -> None:
    # Issue 7: a 30 s S3 outage during a checkpoint or the artifact upload is ridden out in-process.
    default = RetryPolicy()
    assert 90 <= default.window <= 130, default.delays()
    assert max(default.delays()) == 15.0 and default.delays()[:4] == [0.5, 1.0, 2.0, 4.0]
    assert default == RetryPolicy.for_window(OutputSpec().retry_seconds)  # the spec's default is the store's
    assert RetryPolicy.for_window(0).attempts == 1 and RetryPolicy.for_window(0).delays() == []
    for seconds in (1, 7.5, 30, 120, 600):
        policy = RetryPolicy.for_window(seconds)
        assert seconds <= policy.window < seconds + 15, (seconds, policy.delays())
    spec = OutputSpec.model_validate({"endpoint": "http://s3:9000", "bucket": "bkt", "retrySeconds": 8})
    store = run_store(spec, "ns", "r", env={})
    assert isinstance(store, S3Store)
    assert store.retry == RetryPolicy.for_window(8) and store.retry.window >= 8
    # Each try is short: a blackholed endpoint costs seconds per try, not minutes.
    timeout = store.client._http.connection_pool_kw["timeout"]
    assert timeout.connect_timeout <= 5 and timeout.read_timeout <= 20
