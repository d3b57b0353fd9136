"""Leader election between operator replicas on a ``coordination.k8s.io/v1`` Lease, as controller-runtime does it.

Every replica is a candidate. The one holding the Lease runs kopf (and so every handler and daemon); the others
only poll the Lease. The rules:

- the holder renews ``spec.renewTime`` every ``retry_period`` (2 s); when it has not renewed for
  ``renew_deadline`` (10 s), or the Lease names another holder, it has lost leadership and must stop at once;
- a candidate takes the Lease when it does not exist, when its holder is empty (released), or when
  ``renewTime + leaseDurationSeconds`` (15 s) has passed;
- every write carries the ``resourceVersion`` that was read (PUT) or creates the object (POST), so of two
  candidates writing the same Lease the API server accepts one and answers 409 Conflict to the other;
- a leader that shuts down normally releases the Lease (empty ``holderIdentity``, as controller-runtime's
  ``ReleaseOnCancel``), so a standby takes over on its next poll instead of after the lease duration.

The gap between renew deadline and lease duration (5 s) is the time a leader that lost the Lease has to stop
before another replica can take it. The expiry compares the holder's ``renewTime`` with this replica's clock, so
the replicas' clocks must agree to well within that gap (NTP on the nodes).

:func:`decide` is the pure decision on one read of the Lease; :class:`LeaderElector` does the API calls.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import enum
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from kubetune.lifecycle.formats import parse_rfc3339
from kubetune.operator.kube import Kube, KubeError, sleep_or_stop

log = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_LEASE_NAME = "kubetune-operator"
# controller-runtime's defaults (LeaseDuration, RenewDeadline, RetryPeriod; client-go's JitterFactor).
LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
JITTER = 1.2


def lease_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases" + (f"/{quote(name)}" if name else "")


def format_micro_time(epoch: float) -> str:
    """Epoch seconds → a Kubernetes ``MicroTime`` (RFC 3339, UTC, microseconds): ``2026-12-02T10:00:00.123456Z``."""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_namespace(env: Mapping[str, str] | None = None, sa_namespace_file: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The Lease's namespace: ``$POD_NAMESPACE`` (the downward API), else the pod's service-account namespace,
    else ``default`` (outside a cluster)."""
    value = (os.environ if env is None else env).get("POD_NAMESPACE", "").strip()
    if value:
        return value
    try:
        with open(sa_namespace_file) as f:
            value = f.read().strip()
    except OSError:
        value = ""
    return value or "default"


def default_identity(hostname: str | None = None) -> str:
    """Hostname (the pod's name) plus a random suffix: a restarted container never mistakes its predecessor's
    Lease for its own."""
    return f"{hostname or socket.gethostname()}_{secrets.token_hex(3)}"


# ----------------------------------------------------------------------------------------------- decision
class Action(str, enum.Enum):
    CREATE = "create"  # no Lease yet: POST one naming us
    ACQUIRE = "acquire"  # expired or released: PUT it naming us
    RENEW = "renew"  # ours: PUT a fresh renewTime
    STANDBY = "standby"  # another replica holds it


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    body: dict[str, Any] | None  # the Lease to write; None on STANDBY
    holder: str  # the holder the Lease names now ("" when none)
    expires_at: float | None = None  # STANDBY: when the holder's term ends unless renewed (epoch seconds)


def lease_holder(lease: Mapping[str, Any] | None) -> str:
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def lease_expiry(lease: Mapping[str, Any], default_duration: float) -> float | None:
    """When the holder's term ends: last renewal (or acquisition) plus the duration the holder wrote. None when
    the Lease carries neither time: nothing proves its holder alive."""
    spec = lease.get("spec") or {}
    renewed = parse_rfc3339(spec.get("renewTime")) or parse_rfc3339(spec.get("acquireTime"))
    if renewed is None:
        return None
    duration = spec.get("leaseDurationSeconds")
    if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
        return renewed + default_duration
    return renewed + duration


def _written(lease: Mapping[str, Any] | None, spec: Mapping[str, Any], *, name: str, namespace: str) -> dict[str, Any]:
    """The Lease to write: the one read (its resourceVersion makes the PUT conditional) with a new spec."""
    if lease is None:
        return {"apiVersion": LEASE_API_VERSION, "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace}, "spec": dict(spec)}
    body = copy.deepcopy(dict(lease))
    body.setdefault("apiVersion", LEASE_API_VERSION)
    body.setdefault("kind", "Lease")
    body.setdefault("metadata", {}).pop("managedFields", None)  # the server keeps them when left out
    body["spec"] = {**(body.get("spec") or {}), **spec}
    return body


def decide(lease: Mapping[str, Any] | None, identity: str, now: float, lease_duration: float = LEASE_DURATION,
           *, name: str = DEFAULT_LEASE_NAME, namespace: str = "default") -> Decision:
    """What this candidate does with the Lease as read (None: it does not exist), at ``now`` (epoch seconds)."""
    stamp = format_micro_time(now)
    seconds = max(1, round(lease_duration))
    if lease is None:
        spec = {"holderIdentity": identity, "leaseDurationSeconds": seconds, "acquireTime": stamp,
                "renewTime": stamp, "leaseTransitions": 0}
        return Decision(Action.CREATE, _written(None, spec, name=name, namespace=namespace), "")
    holder = lease_holder(lease)
    if holder == identity:
        spec = {"renewTime": stamp, "leaseDurationSeconds": seconds}
        if not (lease.get("spec") or {}).get("acquireTime"):
            spec["acquireTime"] = stamp
        return Decision(Action.RENEW, _written(lease, spec, name=name, namespace=namespace), holder)
    expires_at = lease_expiry(lease, lease_duration)
    if holder and expires_at is not None and now < expires_at:
        return Decision(Action.STANDBY, None, holder, expires_at)
    transitions = (lease.get("spec") or {}).get("leaseTransitions")
    spec = {"holderIdentity": identity, "leaseDurationSeconds": seconds, "acquireTime": stamp, "renewTime": stamp,
            "leaseTransitions": (transitions if isinstance(transitions, int) else 0) + 1}
    return Decision(Action.ACQUIRE, _written(lease, spec, name=name, namespace=namespace), holder)


def release_body(lease: Mapping[str, Any] | None, identity: str, now: float) -> dict[str, Any] | None:
    """The Lease with its holder cleared (controller-runtime's ReleaseOnCancel: empty holder, 1 s duration), or
    None when it is not ours to release."""
    if lease is None or lease_holder(lease) != identity:
        return None
    stamp = format_micro_time(now)
    meta = lease.get("metadata") or {}
    return _written(lease, {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": stamp,
                            "renewTime": stamp}, name=str(meta.get("name", "")),
                    namespace=str(meta.get("namespace", "")))


# ----------------------------------------------------------------------------------------------- elector
@dataclasses.dataclass(frozen=True)
class ElectionConfig:
    namespace: str
    name: str = DEFAULT_LEASE_NAME
    identity: str = dataclasses.field(default_factory=default_identity)
    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD
    jitter: float = JITTER

    def __post_init__(self) -> None:
        # client-go's checks: a leader must give up before its Lease can be taken, and retry before giving up.
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration, got "
                             f"{self.retry_period}, {self.renew_deadline}, {self.lease_duration}")

    @property
    def stop_grace(self) -> float:
        """Seconds a leader that lost the Lease may spend stopping: before another replica can take it (lease
        duration minus renew deadline), less one retry period of margin for a late observation."""
        return max(0.5, self.lease_duration - self.renew_deadline - self.retry_period)


class Outcome(enum.Enum):
    LEADING = "leading"
    FOLLOWING = "following"  # a live Lease names another replica
    FAILED = "failed"  # an error, or another candidate wrote first (409)


# What a single Lease call can fail with: an API answer, a connection problem, a timeout.
CALL_ERRORS = (KubeError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class LeaderElector:
    """Acquires, keeps and releases the Lease through :class:`Kube` (one that does not retry on its own: the
    election loop retries every ``retry_period``)."""

    def __init__(self, kube: Kube, config: ElectionConfig, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.holder = ""  # the holder the Lease named at the last read
        self._expires_at: float | None = None

    @property
    def identity(self) -> str:
        return self.config.identity

    @property
    def path(self) -> str:
        return lease_path(self.config.namespace, self.config.name)

    async def try_acquire_or_renew(self, timeout: float) -> Outcome:
        """One read and (unless another replica holds it) one write of the Lease."""
        cfg = self.config
        try:
            lease = await self.kube.get(self.path, timeout=timeout)
            decision = decide(lease, cfg.identity, self.clock(), cfg.lease_duration, name=cfg.name,
                              namespace=cfg.namespace)
            self.holder, self._expires_at = decision.holder, decision.expires_at
            if decision.body is None:
                return Outcome.FOLLOWING
            if decision.action is Action.CREATE:
                written, created = await self.kube.create(lease_path(cfg.namespace), decision.body, timeout=timeout)
                # A retried POST finds its own first try: not created, but ours.
                return Outcome.LEADING if created or lease_holder(written) == cfg.identity else Outcome.FAILED
            await self.kube.replace(self.path, decision.body, timeout=timeout)
            return Outcome.LEADING
        except CALL_ERRORS as e:
            if isinstance(e, KubeError) and e.status == 409:
                log.debug(f"Lease {cfg.namespace}/{cfg.name}: another candidate wrote first")
            else:
                log.warning(f"Lease {cfg.namespace}/{cfg.name}: {e!r}")
            return Outcome.FAILED

    def next_try_in(self) -> float:
        """Seconds to the next try as a candidate: the retry period with client-go's jitter, but no later than
        the moment the current holder's term ends."""
        delay = self.config.retry_period * (1 + random.random() * self.config.jitter)
        if self._expires_at is not None:
            delay = min(delay, max(0.05, self._expires_at - self.clock() + 0.05))
        return delay

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Try until this replica holds the Lease (True) or ``stop`` is set (False)."""
        announced = ""
        while not stop.is_set():
            outcome = await self.try_acquire_or_renew(timeout=self.config.renew_deadline)
            if outcome is Outcome.LEADING:
                log.info(f"Became the leader: Lease {self.config.namespace}/{self.config.name}, "
                         f"identity {self.identity}.")
                return True
            if outcome is Outcome.FOLLOWING and self.holder != announced:
                announced = self.holder
                log.info(f"Lease {self.config.namespace}/{self.config.name} is held by {announced}; standing by.")
            if await sleep_or_stop(self.next_try_in(), stop):
                break
        return False

    async def keep(self) -> None:
        """Renew every retry period; return once leadership is lost: no renewal within the renew deadline, or the
        Lease names another holder. Plain sleeps, no helper tasks: this runs beside kopf, which cancels the tasks
        it did not see before it started when it stops."""
        cfg = self.config
        renewed = self.monotonic()
        while True:
            await asyncio.sleep(cfg.retry_period)
            left = renewed + cfg.renew_deadline - self.monotonic()
            if left <= 0:
                break
            outcome = await self.try_acquire_or_renew(timeout=left)
            if outcome is Outcome.LEADING:
                renewed = self.monotonic()
            elif outcome is Outcome.FOLLOWING:
                log.error(f"Lease {cfg.namespace}/{cfg.name} was taken by {self.holder}.")
                return
        log.error(f"Lease {cfg.namespace}/{cfg.name} not renewed within {cfg.renew_deadline:.0f}s.")

    async def release(self, timeout: float = 5.0) -> bool:
        """Clear the holder if the Lease is still ours, so that a standby takes over at once."""
        cfg = self.config
        try:
            body = release_body(await self.kube.get(self.path, timeout=timeout), cfg.identity, self.clock())
            if body is None:
                return False
            await self.kube.replace(self.path, body, timeout=timeout)
        except CALL_ERRORS as e:
            log.warning(f"Lease {cfg.namespace}/{cfg.name} not released: {e!r}")
            return False
        log.info(f"Released Lease {cfg.namespace}/{cfg.name}.")
        return True
