"""Shared, in-memory state of one operator process: settings, API client, metrics, the index of the runs'
Jobs and pods (fed by kopf watch handlers), and the global status-patch rate limiter."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from kubetune.api.names import COMPLETION_INDEX_ANNOTATION, NODE_RANK_LABEL
from kubetune.lifecycle.observed import JobState, PodState, job_state, pod_state
from kubetune.operator.kube import Kube
from kubetune.operator.manifests import ATTEMPT_LABEL, RUN_LABEL
from kubetune.operator.metrics import Metrics
from kubetune.operator.settings import Capabilities, OperatorSettings

RunKey = tuple[str, str]  # (namespace, run label value)


@dataclasses.dataclass(frozen=True)
class PodEntry:
    attempt: int
    state: PodState
    rank: int = 0  # node rank in a run over several pods


def node_rank(body: Any) -> int:
    """A pod's node rank: its label (one Job per rank), else its Indexed Job's completion index, else 0."""
    meta = body.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(NODE_RANK_LABEL) or (meta.get("annotations") or {}).get(
        COMPLETION_INDEX_ANNOTATION)
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


class ChildIndex:
    """What the operator knows about the runs' Jobs and pods, from its watches. A follower waits on
    :meth:`wait` instead of polling the API server."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], JobState] = {}
        self._pods: dict[RunKey, dict[str, PodEntry]] = {}
        self._changed: dict[RunKey, asyncio.Event] = {}

    @staticmethod
    def _run_key(body: Any) -> tuple[RunKey, int] | None:
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        run = labels.get(RUN_LABEL)
        if not run:
            return None
        try:
            attempt = int(labels.get(ATTEMPT_LABEL) or 0)
        except ValueError:
            attempt = 0
        return (meta.get("namespace", ""), run), attempt

    def _notify(self, key: RunKey) -> None:
        event = self._changed.get(key)
        if event is not None:
            event.set()

    def on_job(self, event_type: str | None, body: Any) -> None:
        parsed = self._run_key(body)
        if parsed is None:
            return
        key, _ = parsed
        meta = body.get("metadata") or {}
        jkey = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self._jobs.pop(jkey, None)
        else:
            self._jobs[jkey] = job_state(body)
        self._notify(key)

    def on_pod(self, event_type: str | None, body: Any) -> None:
        parsed = self._run_key(body)
        if parsed is None:
            return
        key, attempt = parsed
        name = (body.get("metadata") or {}).get("name", "")
        pods = self._pods.setdefault(key, {})
        state = pod_state(body)
        # A deleted pod's last state stays (gone) until the run's next resync or end: its terminated
        # container carries the trainer's summary (termination message), which decides the attempt even
        # when the pod was removed before its supervisor woke up.
        pods[name] = PodEntry(attempt, dataclasses.replace(state, gone=True, deleting=True)
                              if event_type == "DELETED" else state, node_rank(body))
        self._notify(key)

    def resync(self, key: RunKey, job_name: str, job: Any | None, pods: list[Any]) -> None:
        """Replace what the index holds for one run with a fresh read (its Job, or None when it is gone, and
        all its pods) — what a missed watch event left stale is corrected, and waiters are woken."""
        jkey = (key[0], job_name)
        if job is None:
            self._jobs.pop(jkey, None)
        else:
            self._jobs[jkey] = job_state(job)
        self.resync_pods(key, pods)
        self._notify(key)

    def resync_pods(self, key: RunKey, pods: list[Any]) -> None:
        """Replace the run's pods with a fresh list (what a lagging watch has not reported yet). The last states
        of removed pods stay: they may carry a trainer's summary nobody has read yet."""
        # A pod the list lacks was removed: it is kept as gone, as its DELETED event (which may still be on its
        # way) would keep it.
        fresh = {name: e if e.state.gone else dataclasses.replace(e, state=dataclasses.replace(e.state, gone=True))
                 for name, e in self._pods.get(key, {}).items()}
        for pod in pods:
            parsed = self._run_key(pod)
            if parsed is not None and parsed[0] == key:
                fresh[(pod.get("metadata") or {}).get("name", "")] = PodEntry(parsed[1], pod_state(pod), node_rank(pod))
        if fresh:
            self._pods[key] = fresh
        else:
            self._pods.pop(key, None)

    def job(self, namespace: str, name: str) -> JobState | None:
        return self._jobs.get((namespace, name))

    def pods(self, key: RunKey) -> list[tuple[int, PodState]]:
        """Every known pod of the run, with its attempt."""
        return [(e.attempt, e.state) for e in self._pods.get(key, {}).values()]

    def attempt_pods(self, key: RunKey, attempt: int) -> list[tuple[int, PodState]]:
        """Every known pod of this attempt, removed ones included, with its node rank."""
        return [(e.rank, e.state) for e in self._pods.get(key, {}).values() if e.attempt == attempt]

    def pod(self, key: RunKey, attempt: int) -> PodState | None:
        """The newest pod of node rank 0 of this attempt that still exists, else the last one removed."""
        entries = [e.state for e in self._pods.get(key, {}).values() if e.attempt == attempt and e.rank == 0]
        if not entries:
            return None
        return max(entries, key=lambda p: (not p.gone, p.created or 0.0, p.name))

    def pod_named(self, key: RunKey, name: str) -> PodState | None:
        entry = self._pods.get(key, {}).get(name)
        return entry.state if entry is not None else None

    def ended_pod(self, key: RunKey, attempt: int) -> PodState | None:
        """The newest pod of node rank 0 of this attempt that terminated (its termination message may hold the
        result), removed or not."""
        entries = [e.state for e in self._pods.get(key, {}).values()
                   if e.attempt == attempt and e.rank == 0 and e.state.terminated]
        return max(entries, key=lambda p: (p.created or 0.0, p.name), default=None)

    def register(self, key: RunKey) -> asyncio.Event:
        return self._changed.setdefault(key, asyncio.Event())

    def unregister(self, key: RunKey) -> None:
        self._changed.pop(key, None)

    def forget_run(self, key: RunKey) -> None:
        self._pods.pop(key, None)
        self._changed.pop(key, None)


class TokenBucket:
    """Global rate limit for status patches (all runs together): ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclasses.dataclass
class Context:
    settings: OperatorSettings
    metrics: Metrics
    children: ChildIndex = dataclasses.field(default_factory=ChildIndex)
    kube_client: Kube | None = None
    capabilities: Capabilities | None = None
    limiter: TokenBucket | None = None

    @property
    def kube(self) -> Kube:
        if self.kube_client is None:
            raise RuntimeError("not logged in yet")
        return self.kube_client

    def patch_limiter(self) -> TokenBucket:
        if self.limiter is None:  # created lazily: it needs the running loop
            self.limiter = TokenBucket(self.settings.status_qps)
        return self.limiter

    async def server_capabilities(self) -> Capabilities:
        if self.capabilities is None:
            version = await self.kube.version()
            self.capabilities = Capabilities.from_version(version.get("major", "1"), version.get("minor", "0"))
            self.metrics.info.labels(version=_version(), kubernetes=version.get("gitVersion", "")).set(1)
        return self.capabilities


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kubetune")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "0+unknown"
