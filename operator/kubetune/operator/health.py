"""The operator's health endpoints, one small aiohttp server on ``--health-port``:

- ``/healthz``: 200 while the process and its event loop live, leader or standby (the liveness probe: a
  standby is healthy, restarting it would not make it lead sooner);
- ``/readyz``: 200 ``leader`` once this replica holds the Lease and kopf has started; 503 ``standby`` otherwise
  (the readiness probe: the Service, ``kubectl get pods`` and ``helm --wait`` point at the active replica).
"""

from __future__ import annotations

import asyncio
import dataclasses

from aiohttp import web


@dataclasses.dataclass
class Readiness:
    leading: bool = False
    kopf_started: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # kopf's ready_flag

    @property
    def ready(self) -> bool:
        return self.leading and self.kopf_started.is_set()

    def stopped(self) -> None:
        self.leading = False
        self.kopf_started.clear()


def build_app(readiness: Readiness) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.Response(text="leader")
        return web.Response(status=503, text="standby")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_health_server(port: int, readiness: Readiness, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve the endpoints until ``await runner.cleanup()``. Short keep-alive: probe connections do not linger
    as tasks that kopf would wait for when it stops."""
    runner = web.AppRunner(build_app(readiness), access_log=None, keepalive_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
