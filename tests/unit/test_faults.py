"""The fault proxy (tests/faults.py) sees every request on a kept-alive connection, where a request follows the
previous body with no line break (as the minio client sends them to SeaweedFS, which keeps connections open)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.cluster.system import wait_for
from tests.faults import TcpProxy


@pytest.fixture
def sink() -> Iterator[int]:
    """A server that reads and drops whatever its one client sends; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drain() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(65536):
                pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    listener.close()


def _put(path: str, body: bytes) -> bytes:
    return f"PUT {path} HTTP/1.1\r\nHost: s3\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.unit
def test_requests_after_a_body_on_one_connection_are_each_seen_once(sink: int) -> None:
    proxy = TcpProxy("127.0.0.1", sink)
    try:
        outage = proxy.outage_on(r"^PUT \S*/checkpoints/step-", 0.1)
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(_put("/b/run/checkpoints/latest.json", b"{}"))
            wait_for(lambda: len(proxy.requests) == 1, 5, "the first request", interval=0.02)
            client.sendall(_put("/b/run/manifest.json", b"{}"))  # a new chunk: the previous one is its tail
            wait_for(lambda: len(proxy.requests) == 2, 5, "the second request", interval=0.02)
            client.sendall(_put("/b/run/checkpoints/step-00000004.pt", b"\x00" * 4096))
            wait_for(lambda: outage.trigger is not None, 5, "the outage", interval=0.02)
    finally:
        proxy.close()
    assert outage.trigger == "PUT /b/run/checkpoints/step-00000004.pt"
    assert [(method, path) for method, path, _ in proxy.requests] == [
        ("PUT", "/b/run/checkpoints/latest.json"), ("PUT", "/b/run/manifest.json"),
        ("PUT", "/b/run/checkpoints/step-00000004.pt")]
