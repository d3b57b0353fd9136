"""Simulated kubelets: real log streams at a platform's scale without real pods.

    python -m tests.cluster.simkubelet --nodes 3 --pods-per-node 1000 [--kubeconfig F] [--ready-file F]

Each simulated node is a Node object of the harness cluster whose address and ``daemonEndpoints`` point at a
small HTTPS server of this process, so ``pods/log`` requests go API server → "kubelet" exactly as in production
(the API server dials the node's InternalIP and kubelet port; it verifies no kubelet certificate, as the
harness starts it without ``--kubelet-certificate-authority``). The nodes carry the taint and label
``kubetune.io/simulated=true``: only pods that tolerate it and select it land there (the scale bench sets both
in its runs' ``spec.resources``), never the harness's real workloads.

For every pod the scheduler binds to one of its nodes, this process does what a kubelet does, minus the
container: it reports the pod Running, serves ``/containerLogs/{ns}/{pod}/{container}`` (``follow``,
``timestamps``, ``sinceTime``, ``tailLines``), reports the pod Succeeded or Failed with the trainer's termination
message when its script ends, and removes a pod being deleted. The "trainer" is a script
(:func:`trainer_script`, pure) of the real trainer's event stream, timed from the container's start and read
from the pod's run config (``spec.model.config.standin``, the stand-in trainer's behaviour: ``steps``,
``pace``, ``exit_code``, ``fail_attempts``): ``started``, a ``before`` evaluation, per step a human line and a
``progress`` event, per epoch ``metrics`` and a ``checkpoint``, then the ``after`` evaluation, ``artifact`` and
``finished``. A log is a pure function of the pod's start time, so a reconnect with ``sinceTime`` reads exactly
what a kubelet would give it.

Node heartbeats are Leases in ``kube-node-lease`` renewed every 10 s (the node lifecycle controller's grace
period is 40 s) and the Ready condition refreshed every minute. ``--ready-file`` is written once the nodes are
Ready and the servers listen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from kubetune.api.events import Event, format_event, termination_message
from kubetune.api.names import ATTEMPT_LABEL
from kubetune.lifecycle.formats import now_rfc3339, parse_rfc3339
from kubetune.operator.kube import Kube, KubeError, pods_path, small_tls_read_buffers
from kubetune.operator.manifests import CONFIG_ANNOTATION, CONTAINER_NAME

SIMULATED = "kubetune.io/simulated"
HEARTBEAT_SECONDS = 10.0
READY_REFRESH_SECONDS = 60.0
CONTAINER_START_SECONDS = 0.5  # from binding to "container started"


# ------------------------------------------------------------------------------------------------ the trainer
@dataclasses.dataclass(frozen=True)
class Script:
    """A simulated trainer's output: (seconds after the container's start, line) in order, its exit code, and
    its termination message."""

    lines: tuple[tuple[float, str], ...]
    exit_code: int
    message: str

    @property
    def duration(self) -> float:
        return self.lines[-1][0] if self.lines else 0.0


def trainer_script(config: Mapping[str, Any], attempt: int, start: float) -> Script:
    """The real trainer's event stream for the run config ``config`` (``metadata``, ``spec``) and attempt
    ``attempt``, its events timed from ``start`` (the container's start, epoch seconds). Pure."""
    spec = config.get("spec") or {}
    meta = config.get("metadata") or {}
    behaviour = ((spec.get("model") or {}).get("config") or {}).get("standin") or {}
    epochs = int((spec.get("training") or {}).get("epochs") or 1)
    steps = int(behaviour.get("steps") or epochs * 5)
    pace = float(behaviour.get("pace", 5.0))
    exit_code = int(behaviour.get("exit_code", 0))
    fail_attempts = int(behaviour.get("fail_attempts", 0))
    if fail_attempts and attempt > fail_attempts:
        exit_code = 0
    base = f"s3://kubetune/kubetune/{meta.get('namespace', 'default')}/{meta.get('name', 'run')}"
    out: list[tuple[float, str]] = []
    summary: list[Event] = []

    def emit(offset: float, kind: Any, **fields: Any) -> None:
        line = format_event(kind, time=round(start + offset, 6), **fields)
        out.append((offset, line))
        if kind in ("artifact", "finished", "failed") or (kind == "evaluation" and fields.get("stage") == "after"):
            summary.append(Event.model_validate({"type": kind, "time": start + offset, **fields}))

    out.append((0.0, f"simulated trainer: run {meta.get('name')} attempt {attempt}, {steps} steps"))
    emit(0.0, "started", epochs=epochs, total_steps=steps)
    emit(0.01, "evaluation", stage="before", epoch=0, metrics={"recall_at_k": 0.25, "mrr": 0.1})
    steps_per_epoch = max(1, math.ceil(steps / epochs))
    for step in range(1, steps + 1):
        t = step * pace
        epoch = min(epochs, (step - 1) // steps_per_epoch + 1)
        loss = round(2.0 / math.sqrt(step), 5)
        out.append((t, f"step {step}/{steps} epoch {epoch} loss {loss:.4f}"))
        emit(t, "progress", epoch=epoch, epochs=epochs, step=step, total_steps=steps, loss=loss, lr=1e-5,
             samples_per_second=round(64 / pace, 2), eta_seconds=round((steps - step) * pace, 2))
        if step % steps_per_epoch == 0 or step == steps:
            emit(t, "metrics", stage="val", epoch=epoch, step=step, train_loss=loss, val_loss=round(loss * 1.1, 5))
            emit(t, "checkpoint", uri=f"{base}/checkpoints/step-{step}", step=step, epoch=epoch)
    end = steps * pace + 0.01
    if exit_code:
        emit(end, "failed", reason="SimulatedFailure", message="configured failure at the end",
             retryable=exit_code in (75, 137, 143))
    else:
        emit(end, "evaluation", stage="after", epoch=epochs, metrics={"recall_at_k": 0.75, "mrr": 0.5, "R@5": 0.75})
        emit(end, "artifact", uri=f"{base}/", size=4096)
        emit(end, "finished", uri=f"{base}/")
        out.append((end, "simulated trainer: done"))
    return Script(tuple(out), exit_code, termination_message(summary))


def rfc3339_nano(t: float) -> str:
    """A kubelet's log timestamp: RFC 3339 with nanoseconds, UTC."""
    whole = math.floor(t)
    stamp = dt.datetime.fromtimestamp(whole, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{min(999_999_999, round((t - whole) * 1e9)):09d}Z"


def micro_time(t: float) -> str:
    """A Lease's ``MicroTime``: RFC 3339 with microseconds, UTC."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------ the kubelet
@dataclasses.dataclass
class SimPod:
    namespace: str
    name: str
    started: float
    script: Script
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # ended or removed
    removed: bool = False


class SimulatedKubelets:
    """The nodes, their log servers, and the pods bound to them (see the module's docstring)."""

    def __init__(self, kube: Kube, host_ip: str, names: list[str], pods_per_node: int) -> None:
        self.kube = kube
        self.host_ip = host_ip
        self.names = names
        self.pods_per_node = pods_per_node
        self.ports: dict[str, int] = {}
        self.pods: dict[tuple[str, str], SimPod] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.removing: set[tuple[str, str]] = set()
        self.runners: list[web.AppRunner] = []

    # ---- servers
    async def serve(self, ssl_context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        for name in self.names:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "0.0.0.0", 0, ssl_context=ssl_context, backlog=4096)
            await site.start()
            server = site._server
            assert server is not None
            self.ports[name] = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            self.runners.append(runner)

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["namespace"], request.match_info["pod"])
        pod = self.pods.get(key)
        if pod is None or request.match_info["container"] != CONTAINER_NAME:
            return web.Response(status=404, text=f"container {request.match_info['container']} of pod "
                                                 f"{key[0]}/{key[1]} is not known here")
        query = request.query
        follow = query.get("follow") in ("true", "1")
        stamps = query.get("timestamps") in ("true", "1")
        since = parse_rfc3339(query["sinceTime"]) if query.get("sinceTime") else None
        lines = [(pod.started + offset, text) for offset, text in pod.script.lines]
        if since is not None:
            lines = [(t, text) for t, text in lines if t >= since]
        if not follow:
            now = time.time()
            lines = [(t, text) for t, text in lines if t <= now]
        if query.get("tailLines"):
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) else []
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            for t, text in lines:
                wait = t - time.time()
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(pod.done.wait(), wait)
                    if pod.removed:
                        break
                await response.write(((rfc3339_nano(t) + " ") if stamps else "").encode() + text.encode() + b"\n")
        except (ConnectionResetError, aiohttp.ClientConnectionError):
            return response
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # ---- nodes
    async def register(self) -> None:
        for name in self.names:
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": {SIMULATED: "true", "kubernetes.io/hostname": name,
                                                          "kubernetes.io/os": "linux"}},
                    "spec": {"taints": [{"key": SIMULATED, "value": "true", "effect": "NoSchedule"}]}}
            await self.kube.create("/api/v1/nodes", node)
            await self.node_status(name)
            await self.kube.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": micro_time(time.time())}})

    async def node_status(self, name: str) -> None:
        now = now_rfc3339(time.time())
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "message": ok,
                       "lastHeartbeatTime": now, "lastTransitionTime": now}
                      for kind, ok in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                                       ("PIDPressure", "SufficientPID"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "simulated kubelet is posting ready status", "lastHeartbeatTime": now,
                           "lastTransitionTime": now})
        capacity = {"cpu": "1000", "memory": "4000Gi", "pods": str(self.pods_per_node), "ephemeral-storage": "100Ti"}
        status = {"capacity": capacity, "allocatable": capacity, "conditions": conditions,
                  "addresses": [{"type": "InternalIP", "address": self.host_ip}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": self.ports[name]}},
                  "nodeInfo": {"kubeletVersion": "v1.20.2-simulated", "kubeProxyVersion": "v1.20.2-simulated",
                               "operatingSystem": "linux", "architecture": "amd64", "containerRuntimeVersion": "sim://1",
                               "machineID": name, "systemUUID": name, "bootID": name, "kernelVersion": "sim",
                               "osImage": "simulated"}}
        await self.kube.request("PATCH", f"/api/v1/nodes/{name}/status", body={"status": status},
                                content_type="application/merge-patch+json")

    async def heartbeat(self) -> None:
        last_ready = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            for name in self.names:
                with contextlib.suppress(KubeError, aiohttp.ClientError, asyncio.TimeoutError):
                    await self.kube.request(
                        "PATCH", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                        body={"spec": {"renewTime": micro_time(time.time())}},
                        content_type="application/merge-patch+json")
                    if time.monotonic() - last_ready >= READY_REFRESH_SECONDS:
                        await self.node_status(name)
            if time.monotonic() - last_ready >= READY_REFRESH_SECONDS:
                last_ready = time.monotonic()

    async def unregister(self) -> None:
        for name in self.names:
            with contextlib.suppress(KubeError, aiohttp.ClientError):
                await self.kube.delete(f"/api/v1/nodes/{name}")
                await self.kube.delete(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}")

    # ---- pods
    async def watch_pods(self) -> None:
        """Pods bound to these nodes, from a list then a watch (relisted when the watch expires)."""
        while True:
            try:  # an API server overloaded by the bench answers slowly or not at all: list again
                listed = await self.kube.request("GET", "/api/v1/pods", params={"resourceVersion": "0"},
                                                 timeout=120.0)
            except (KubeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                print(f"listing pods failed, again in 1 s: {e!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)
                continue
            for pod in listed.get("items") or ():
                self.on_pod("ADDED", pod)
            version = (listed.get("metadata") or {}).get("resourceVersion")
            with contextlib.suppress(KubeError, aiohttp.ClientError, asyncio.TimeoutError):
                async for line in self.kube.stream_lines("/api/v1/pods", {
                        "watch": "true", "resourceVersion": version, "timeoutSeconds": "300"}):
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        break
                    self.on_pod(event["type"], event["object"])

    def on_pod(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if spec.get("nodeName") not in self.ports:
            return
        known = self.pods.get(key)
        if kind == "DELETED":
            if known is not None:
                known.removed = True
                known.done.set()
                self.pods.pop(key, None)
            self.removing.discard(key)
            return
        if meta.get("deletionTimestamp"):
            if key not in self.removing:
                self.removing.add(key)
                self.spawn(self.remove(key, known))
            return
        phase = (pod.get("status") or {}).get("phase")
        if known is None and phase in (None, "Pending"):
            annotations = meta.get("annotations") or {}
            try:
                config = json.loads(annotations.get(CONFIG_ANNOTATION) or "{}")
            except ValueError:
                config = {}
            attempt = int((meta.get("labels") or {}).get(ATTEMPT_LABEL) or 1)
            started = time.time() + CONTAINER_START_SECONDS
            sim = SimPod(key[0], key[1], started, trainer_script(config, attempt, started))
            self.pods[key] = sim
            self.spawn(self.live(sim))

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def patch_status(self, pod: SimPod, status: dict[str, Any]) -> None:
        await self.until_taken("PATCH", pods_path(pod.namespace, pod.name, "status"), {"status": status},
                               "application/merge-patch+json")

    async def until_taken(self, method: str, path: str, body: Any, content_type: str = "application/json") -> None:
        """One request, tried until the API server takes it (an overloaded one may not answer for minutes) or
        the object is gone, as a kubelet keeps reporting."""
        while True:
            try:
                await self.kube.request(method, path, body=body, content_type=content_type, timeout=120.0)
                return
            except KubeError as e:
                if e.status == 404 or not e.transient:
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(1.0)

    async def live(self, pod: SimPod) -> None:
        """Running at the container's start, terminated at its script's end."""
        await asyncio.sleep(max(0.0, pod.started - time.time()))
        started = now_rfc3339(pod.started)
        ready = [{"type": kind, "status": "True", "lastTransitionTime": started}
                 for kind in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
        container = {"name": CONTAINER_NAME, "image": "kubetune/simulated", "imageID": "sim://trainer",
                     "containerID": f"sim://{pod.namespace}.{pod.name}", "restartCount": 0}
        await self.patch_status(pod, {
            "phase": "Running", "hostIP": self.host_ip, "podIP": self.host_ip, "startTime": started,
            "conditions": ready,
            "containerStatuses": [{**container, "ready": True, "started": True,
                                   "state": {"running": {"startedAt": started}}}]})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pod.done.wait(), pod.script.duration + pod.started - time.time())
        if pod.removed:
            return
        code = pod.script.exit_code
        await self.patch_status(pod, {
            "phase": "Failed" if code else "Succeeded",
            "conditions": [{**c, "status": "False"} if c["type"] in ("Ready", "ContainersReady") else c
                           for c in ready],
            "containerStatuses": [{**container, "ready": False, "started": False, "state": {"terminated": {
                "exitCode": code, "reason": "Error" if code else "Completed", "message": pod.script.message,
                "startedAt": started, "finishedAt": now_rfc3339(time.time()),
                "containerID": container["containerID"]}}}]})
        pod.done.set()

    async def remove(self, key: tuple[str, str], pod: SimPod | None) -> None:
        """A pod being deleted: its trainer is stopped (SIGTERM: exit 143) and the pod removed, as a kubelet
        does once the container is gone."""
        if pod is not None:
            pod.removed = True
            pod.done.set()
            if not pod.script.lines or time.time() < pod.started + pod.script.duration:
                await self.patch_status(pod, {"phase": "Failed", "containerStatuses": [{
                    "name": CONTAINER_NAME, "image": "kubetune/simulated", "imageID": "sim://trainer",
                    "restartCount": 0, "ready": False, "started": False, "state": {"terminated": {
                        "exitCode": 143, "reason": "Error", "startedAt": now_rfc3339(pod.started),
                        "finishedAt": now_rfc3339(time.time())}}}]})
        await self.until_taken("DELETE", pods_path(*key), {"gracePeriodSeconds": 0})


# ------------------------------------------------------------------------------------------------ the process
class SimulatedKubeletsProcess:
    """This module run as a subprocess (its CPU is then its own): started with :meth:`start`, which waits until
    its nodes are registered and its servers listen, and stopped (nodes removed) with :meth:`stop`."""

    def __init__(self, kubeconfig: str | Path, *, nodes: int = 1, pods_per_node: int = 1100,
                 prefix: str = "sim", log_path: Path | None = None) -> None:
        self.kubeconfig = str(kubeconfig)
        self.nodes = nodes
        self.pods_per_node = pods_per_node
        self.prefix = prefix
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"kubetune-{prefix}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> SimulatedKubeletsProcess:
        ready = self.log_path.with_suffix(".ready.json")
        ready.unlink(missing_ok=True)
        root = Path(__file__).resolve().parents[2]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster.simkubelet", "--nodes", str(self.nodes), "--pods-per-node",
                 str(self.pods_per_node), "--prefix", self.prefix, "--kubeconfig", self.kubeconfig,
                 "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=log, cwd=str(root))
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"simulated kubelets did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kube_from_kubeconfig(path: Path) -> tuple[Kube, str]:
    """An admin :class:`Kube` from a token kubeconfig, and the API server's host."""
    doc = yaml.safe_load(path.read_text())
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    server = cluster["server"]
    kube = Kube(server, headers={"Authorization": f"Bearer {user['token']}"}, ssl_context=context)
    return kube, server.split("://", 1)[1].rsplit(":", 1)[0]


def self_signed(directory: Path) -> ssl.SSLContext:
    key, cert = directory / "kubelet.key", directory / "kubelet.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=simulated-kubelet"], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def amain(args: argparse.Namespace) -> None:
    kube, host = kube_from_kubeconfig(args.kubeconfig)
    names = [f"{args.prefix}-{i}" for i in range(args.nodes)]
    sims = SimulatedKubelets(kube, host, names, args.pods_per_node)
    with tempfile.TemporaryDirectory() as tmp:
        await sims.serve(self_signed(Path(tmp)))
    await sims.register()
    tasks = [asyncio.ensure_future(sims.heartbeat()), asyncio.ensure_future(sims.watch_pods())]
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"nodes": sims.ports, "pid": os.getpid()}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await sims.unregister()
    await kube.close()


def main(argv: list[str] | None = None) -> int:
    small_tls_read_buffers()  # one TLS connection per served log, as in the operator
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--pods-per-node", type=int, default=1000)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--kubeconfig", type=Path, default=Path(os.environ.get(
        "KUBECONFIG", "/tmp/kubetune-cluster/admin.kubeconfig")))
    p.add_argument("--ready-file", type=Path, default=None)
    asyncio.run(amain(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
