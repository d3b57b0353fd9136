"""A small asyncio Kubernetes API client on aiohttp (which kopf already depends on).

Why not the ``kubernetes`` package here: it is synchronous, and following hundreds of pod logs with it needs a
thread per stream. One event loop with aiohttp follows them all. Credentials come from kopf's own login
(:class:`kopf.ConnectionInfo`), so the operator and its handlers authenticate identically.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from kubetune.api.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
MAX_LINE_BYTES = 128 * 1024
# An API server that restarts (an upgrade, a crash, a control-plane move) refuses connections, drops them or
# answers 429/5xx for a while: requests are retried with backoff for up to this long before the error surfaces.
# Without it a status patch during the outage killed the run's supervisor (kopf retries daemons after 60 s).
RETRY_FOR_SECONDS = 60.0
RETRY_BACKOFF = (0.5, 1.0, 2.0, 3.0, 5.0)  # then 5 s between tries
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str, *, object_name: str | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.object_name = object_name  # the Status' details.name: which object a NotFound is about

    @property
    def transient(self) -> bool:
        """Worth retrying: overload and gateway errors, and a 404 that names no object. An API server that has
        just started answers that for custom resources until it has loaded their CRDs; taking it for "the run
        was deleted" would stop following a live run for good."""
        return self.status in RETRY_STATUSES or (self.status == 404 and not self.object_name)


# -------------------------------------------------------------------------------------------- paths
def runs_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def jobs_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs" + (f"/{quote(name)}" if name else "")


def services_path(namespace: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/services" + (f"/{quote(name)}" if name else "")


def pods_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/pods" + (f"/{quote(name)}" if name else "")
    return path + (f"/{subresource}" if subresource else "")


def split_log_line(raw: str) -> tuple[str | None, str]:
    """``"<RFC3339 timestamp> <text>"`` (``timestamps=true``) → (timestamp, text)."""
    stamp, sep, text = raw.partition(" ")
    if sep and len(stamp) >= 20 and stamp[4:5] == "-" and stamp.endswith("Z"):
        return stamp, text
    return None, raw


# -------------------------------------------------------------------------------------------- client
class Kube:
    """Minimal JSON client: get/create/patch/delete/list and a line stream for pod logs."""

    def __init__(self, server: str, *, headers: Mapping[str, str] | None = None,
                 ssl_context: Any = None, relogin: Callable[[], Any] | None = None,
                 retry_for: float = RETRY_FOR_SECONDS) -> None:
        self.server = server.rstrip("/")
        self.headers = dict(headers or {})
        self.ssl_context = ssl_context
        self.relogin = relogin  # re-read credentials after a 401 (rotated service-account tokens)
        self.retry_for = retry_for  # seconds a request keeps retrying an unreachable/overloaded API server
        self._session: aiohttp.ClientSession | None = None
        # Told of every answer (verb, HTTP status; 0: no answer): the operator counts its API requests.
        self.on_response: Callable[[str, int], None] | None = None

    @classmethod
    def from_connection_info(cls, info: Any, relogin: Callable[[], Any] | None = None, *,
                             retry_for: float = RETRY_FOR_SECONDS) -> Kube:
        """Build from a :class:`kopf.ConnectionInfo` (what kopf's login handlers return)."""
        headers = dict(info.as_http_headers())
        return cls(info.server, headers=headers, ssl_context=info.as_ssl_context(), relogin=relogin,
                   retry_for=retry_for)

    def update_credentials(self, info: Any) -> None:
        self.headers = dict(info.as_http_headers())

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl_context),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                headers={"User-Agent": "kubetune-operator"},
            )
        return self._session

    def _answered(self, verb: str, status: int) -> None:
        if self.on_response is not None:
            self.on_response(verb, status)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout: float = 30.0) -> Any:
        """One API call; connection failures and transient answers (429/502/503/504, a 404 naming no object) are
        retried with backoff for ``retry_for`` seconds (an API server restart). Retrying is safe for every call
        the operator makes: GET and merge patches are idempotent, a repeated POST answers 409 (``create`` adopts
        the object), a repeated DELETE 404 (``delete`` returns False)."""
        deadline = time.monotonic() + self.retry_for
        for tries in itertools.count():
            try:
                return await self._request_once(method, path, params=params, body=body, content_type=content_type,
                                                timeout=timeout)
            # ClientConnectionError: refused, reset, dropped, TLS cut (an HTTP answer is a KubeError instead).
            except (KubeError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                transient = not isinstance(e, KubeError) or e.transient
                delay = RETRY_BACKOFF[min(tries, len(RETRY_BACKOFF) - 1)]
                if not transient or time.monotonic() + delay > deadline:
                    raise
                if tries == 0:  # one line per outage and call, no traceback: this is expected to pass
                    log.warning(f"{method} {path}: {e!r}; retrying for up to {self.retry_for:.0f}s")
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_once(self, method: str, path: str, *, params: Mapping[str, Any] | None,
                            body: Any, content_type: str, timeout: float) -> Any:
        data = None if body is None else json.dumps(body, allow_nan=False)
        for attempt in (1, 2):
            headers = {**self.headers, "Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            try:
                resp = await self.session.request(method, self.server + path, params=params, data=data,
                                                  headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self._answered(method, 0)
                raise
            self._answered(method, resp.status)
            async with resp:
                if resp.status == 401 and attempt == 1 and self.relogin is not None:
                    self.relogin()
                    continue
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(resp.status, text)
                return json.loads(text) if text else None
        raise KubeError(401, "Unauthorized", "credentials rejected twice")  # pragma: no cover

    async def get(self, path: str, params: Mapping[str, Any] | None = None,
                  *, timeout: float = 30.0) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path, params=params, timeout=timeout)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, collection_path: str, obj: Mapping[str, Any],
                     *, timeout: float = 30.0) -> tuple[dict[str, Any], bool]:
        """Create; on 409 return the existing object. Returns (object, created)."""
        try:
            return await self.request("POST", collection_path, body=obj, timeout=timeout), True
        except KubeError as e:
            if e.status != 409:
                raise
        existing = await self.get(f"{collection_path}/{quote(obj['metadata']['name'])}", timeout=timeout)
        if existing is None:  # deleted in between: let the caller retry
            raise KubeError(409, "Conflict", f"{obj['metadata']['name']} exists and vanished")
        return existing, False

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def replace(self, path: str, obj: Mapping[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
        """PUT the whole object. With ``metadata.resourceVersion`` set, the API server answers 409 Conflict
        (a :class:`KubeError`, not retried) when the object changed since it was read: optimistic concurrency."""
        return await self.request("PUT", path, body=obj, timeout=timeout)

    async def delete(self, path: str, *, propagation: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        try:
            await self.request("DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1",
                                                     "propagationPolicy": propagation})
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise

    async def delete_collection(self, collection_path: str, label_selector: str,
                                *, propagation: str = "Background") -> int:
        """Delete every object matching the selector (list + delete: works for every resource)."""
        items = await self.list(collection_path, label_selector)
        deleted = 0
        for item in items:
            if await self.delete(f"{collection_path}/{quote(item['metadata']['name'])}", propagation=propagation):
                deleted += 1
        return deleted

    async def list(self, collection_path: str, label_selector: str | None = None, *,
                   cached: bool = False) -> list[dict[str, Any]]:
        """The collection's items. ``cached``: from the API server's watch cache (``resourceVersion=0``), not
        a quorum read from etcd: as fresh as the server's watches, at a fraction of the cost."""
        params = {"labelSelector": label_selector} if label_selector else {}
        if cached:
            params["resourceVersion"] = "0"
        result = await self.request("GET", collection_path, params=params)
        return list((result or {}).get("items") or [])

    async def version(self) -> dict[str, Any]:
        return await self.request("GET", "/version")

    async def stream_lines(self, path: str, params: Mapping[str, Any],
                           on_open: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[str]:
        """Yield lines (without newline) of a streaming GET, e.g. a followed pod log. Over-long lines are cut.
        ``on_open`` is awaited once the server accepted the request (before the first line)."""
        headers = dict(self.headers)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        try:
            resp = await self.session.get(self.server + path, params=params, headers=headers, timeout=timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self._answered("STREAM", 0)
            raise
        self._answered("STREAM", resp.status)
        async with resp:
            if resp.status >= 400:
                if resp.status == 401 and self.relogin is not None:
                    self.relogin()
                raise _error(resp.status, await resp.text())
            if on_open is not None:
                await on_open()
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        break
                    line, buffer = buffer[:newline], buffer[newline + 1:]
                    yield line[:MAX_LINE_BYTES].decode("utf-8", "replace")
                if len(buffer) > MAX_LINE_BYTES:  # a line without end: emit what fits, drop the rest
                    yield buffer[:MAX_LINE_BYTES].decode("utf-8", "replace")
                    buffer = b""
            if buffer:
                yield buffer.decode("utf-8", "replace")


#: Bytes asyncio reads from a TLS connection at once: a TLS record holds at most 16 KiB.
TLS_READ_BUFFER = 16 * 1024


def small_tls_read_buffers() -> None:
    """asyncio gives every TLS connection a read buffer of ``SSLProtocol.max_size`` (256 KiB), zero-filled at once.
    The operator holds one connection per followed trainer log, so at scale those buffers were most of its memory
    (2,000 streams × 256 KiB = 500 MiB). A record-sized buffer reads the same bytes in more, cheap calls."""
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _error(status: int, text: str) -> KubeError:
    try:
        payload = json.loads(text)
        details = payload.get("details") or {}
        return KubeError(status, str(payload.get("reason") or ""), str(payload.get("message") or text),
                         object_name=str(details.get("name") or "") or None if isinstance(details, dict) else None)
    except (ValueError, AttributeError):
        return KubeError(status, "", text[:500])


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep; True when ``stop`` was set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False
