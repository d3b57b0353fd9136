"""Fault injection shared by the integration and e2e tests.

:class:`TcpProxy` sits between an S3 client (the test process, or a trainer pod reaching the host through the
node IP) and a real S3 server, and makes outages: ``down()`` refuses new connections (RST) and cuts the open
ones, ``up()`` resumes; :meth:`TcpProxy.outage_on` arms an outage that starts by itself when a request line
matching a pattern goes through (e.g. the first ``PUT`` of a checkpoint) and lasts a given time.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_RST_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, as a dead server would
# Not anchored at a line start: on a kept-alive connection a request follows the previous body directly
# (`{}PUT /bucket/key HTTP/1.1`), as the minio client sends them to a server that keeps connections open.
_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE|OPTIONS|PATCH) (/\S*) HTTP/1\.[01]\r\n")


@dataclass
class Outage:
    """One outage: armed for requests matching ``pattern``, or started by hand (``pattern`` None)."""

    seconds: float
    pattern: re.Pattern[str] | None = None
    trigger: str | None = None  # the request line that started it
    started: float | None = None  # time.monotonic()
    ended: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def duration(self) -> float | None:
        return None if self.started is None or self.ended is None else self.ended - self.started


def _cut(sock: socket.socket, reset: bool) -> None:
    """Shut ``sock`` (wakes the thread reading it) and close it; with ``reset`` the peer gets an RST, so a client
    busy sending a body fails at once instead of waiting for its socket timeout."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_ON_CLOSE)
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """``listen_host:<port>`` → target. Bind ``0.0.0.0`` for pods (through the node IP: :meth:`endpoint_for`).

    ``requests`` records every request line seen (method, path, monotonic time); ``refused`` counts the
    connections refused during outages.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server((listen_host, 0))
        self.port = int(self.listener.getsockname()[1])
        self.available = threading.Event()
        self.available.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.armed: list[Outage] = []
        self.outages: list[Outage] = []
        self.requests: list[tuple[str, str, float]] = []
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint_for(self, host: str) -> str:
        """The proxy's endpoint as seen from elsewhere, e.g. a pod reaching the host on its node IP."""
        return f"http://{host}:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.available.is_set():
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_ON_CLOSE)
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        tail = b""  # the end of the previous chunk: a request line split across two reads is still seen
        try:
            while data := src.recv(65536):
                if from_client:
                    seen = tail + data
                    if self._inspect(seen, len(tail)):
                        return  # an outage started on this request: it never reaches the server
                    tail = seen[-2048:]
                if not self.available.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _cut(s, reset=not self.available.is_set())

    def _inspect(self, data: bytes, seen_before: int = 0) -> bool:
        """Record request lines; start an armed outage whose pattern matches one. True if one started. A line
        within the first ``seen_before`` bytes (the previous chunk's tail) was inspected already."""
        for match in _REQUEST_LINE.finditer(data):
            if match.end() <= seen_before:
                continue
            method, path = match.group(1).decode(), match.group(2).decode("latin-1")
            line = f"{method} {path}"
            with self.lock:
                self.requests.append((method, path, time.monotonic()))
                hit = next((o for o in self.armed if o.pattern is not None and o.pattern.search(line)), None)
                if hit is None:
                    continue
                self.armed.remove(hit)
            hit.trigger = line
            self._start(hit)
            return True
        return False

    def _start(self, outage: Outage) -> None:
        outage.started = time.monotonic()
        self.outages.append(outage)
        self.down()

        def end() -> None:
            outage.ended = time.monotonic()
            self.up()
            outage.done.set()

        timer = threading.Timer(outage.seconds, end)
        timer.daemon = True
        timer.start()

    def outage_on(self, pattern: str, seconds: float) -> Outage:
        """Arm a one-shot outage: the first request whose line (``"PUT /bucket/key?query"``) matches the regex
        ``pattern`` is cut, and for ``seconds`` new connections are refused and open ones cut."""
        outage = Outage(seconds, re.compile(pattern))
        with self.lock:
            self.armed.append(outage)
        return outage

    def outage_now(self, seconds: float) -> Outage:
        outage = Outage(seconds)
        self._start(outage)
        return outage

    def down(self) -> None:
        self.available.clear()
        with self.lock:
            for s in self.conns:
                _cut(s, reset=True)
            self.conns = []

    def up(self) -> None:
        self.available.set()

    def close(self) -> None:
        self.closed = True
        self.down()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
