"""Lease-based leader election: the pure decision on one read of the Lease (fake clock), the elector against an
in-memory Lease store that enforces resourceVersion like the API server, the health endpoints, the flags."""

from __future__ import annotations

import asyncio
import copy
import socket
from typing import Any, cast

import aiohttp
import pytest
from kubetune.lifecycle.formats import parse_rfc3339
from kubetune.operator.__main__ import election_config, parse_args
from kubetune.operator.health import Readiness, start_health_server
from kubetune.operator.kube import Kube, KubeError
from kubetune.operator.leader import (
    Action,
    ElectionConfig,
    LeaderElector,
    Outcome,
    decide,
    default_identity,
    default_namespace,
    format_micro_time,
    lease_path,
    release_body,
)

pytestmark = pytest.mark.unit

ME, OTHER = "op-a_1a2b3c", "op-b_4d5e6f"
T0_TEXT = "2026-12-02T10:00:00.123456Z"  # MicroTime, as the API server writes renewTime


def epoch(text: str) -> float:
    value = parse_rfc3339(text)
    assert value is not None
    return value


T0 = epoch(T0_TEXT)


def lease(holder: str | None, renew: str | None = T0_TEXT, *, duration: int | None = 15,
          acquire: str | None = None, transitions: int = 3) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseTransitions": transitions}
    for key, value in (("holderIdentity", holder), ("renewTime", renew), ("leaseDurationSeconds", duration),
                       ("acquireTime", acquire)):
        if value is not None:
            spec[key] = value
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kubetune-operator", "namespace": "ops", "resourceVersion": "41",
                         "managedFields": [{"manager": "x"}]},
            "spec": spec}


# ------------------------------------------------------------------------------------------ decision
CASES: list[tuple[str, dict[str, Any] | None, float, Action]] = [
    ("no lease yet", None, 0.0, Action.CREATE),
    ("held by another, fresh", lease(OTHER), 5.0, Action.STANDBY),
    ("held by another, 1 µs before expiry", lease(OTHER), 14.999999, Action.STANDBY),
    ("held by another, expired", lease(OTHER), 15.0, Action.ACQUIRE),
    ("held by another, long expired", lease(OTHER), 3600.0, Action.ACQUIRE),
    ("own lease, fresh", lease(ME), 2.0, Action.RENEW),
    ("own lease, even past expiry", lease(ME), 30.0, Action.RENEW),
    ("released: empty holderIdentity", lease(""), 0.5, Action.ACQUIRE),
    ("released: no holderIdentity at all", lease(None), 0.5, Action.ACQUIRE),
    ("missing renewTime, acquireTime fresh", lease(OTHER, None, acquire=T0_TEXT), 5.0, Action.STANDBY),
    ("missing renewTime and acquireTime", lease(OTHER, None), 0.0, Action.ACQUIRE),
    ("unparsable renewTime", lease(OTHER, "yesterday"), 0.0, Action.ACQUIRE),
    ("holder's own longer duration counts", lease(OTHER, duration=60), 30.0, Action.STANDBY),
    ("holder's duration missing: ours", lease(OTHER, duration=None), 16.0, Action.ACQUIRE),
    ("renewTime without fraction", lease(OTHER, "2026-12-02T10:00:00Z"), 14.8, Action.STANDBY),
    ("renewTime without fraction, expired", lease(OTHER, "2026-12-02T10:00:00Z"), 14.9, Action.ACQUIRE),
]


@pytest.mark.parametrize(("what", "current", "after", "action"), CASES, ids=[c[0] for c in CASES])
def test_decide(what: str, current: dict[str, Any] | None, after: float, action: Action) -> None:
    now = T0 + after
    decision = decide(current, ME, now, 15.0, name="kubetune-operator", namespace="ops")
    assert decision.action is action, what
    if action is Action.STANDBY:
        assert decision.body is None and decision.holder == OTHER and decision.expires_at is not None
        assert decision.expires_at > now
        return
    body = decision.body
    assert body is not None
    spec = body["spec"]
    assert spec["holderIdentity"] == ME and spec["leaseDurationSeconds"] == 15
    assert spec["renewTime"] == format_micro_time(now)
    assert body["metadata"]["name"] == "kubetune-operator" and body["metadata"]["namespace"] == "ops"
    if current is None:
        assert "resourceVersion" not in body["metadata"] and spec["leaseTransitions"] == 0
        assert spec["acquireTime"] == spec["renewTime"]
        return
    # Updates are conditional on what was read, and leave the server-side bookkeeping out.
    assert body["metadata"]["resourceVersion"] == "41" and "managedFields" not in body["metadata"]
    assert current["metadata"]["managedFields"], "the input is not mutated"
    if action is Action.RENEW:
        assert spec["leaseTransitions"] == 3 and spec.get("acquireTime") == current["spec"].get("acquireTime",
                                                                                                 spec["renewTime"])
    else:
        assert spec["leaseTransitions"] == 4 and spec["acquireTime"] == spec["renewTime"]


def test_micro_time_round_trip_keeps_microseconds() -> None:
    assert format_micro_time(T0) == T0_TEXT
    assert parse_rfc3339(format_micro_time(T0 + 0.000001)) == pytest.approx(T0 + 0.000001, abs=1e-7)
    late = decide(lease(OTHER, duration=15), ME, T0 + 15 - 0.000002, 15.0)
    assert late.action is Action.STANDBY and late.expires_at == pytest.approx(T0 + 15, abs=1e-6)


def test_release_clears_only_own_lease() -> None:
    body = release_body(lease(ME), ME, T0 + 1)
    assert body is not None
    assert body["spec"]["holderIdentity"] == "" and body["spec"]["leaseDurationSeconds"] == 1
    assert body["metadata"]["resourceVersion"] == "41" and body["spec"]["leaseTransitions"] == 3
    assert release_body(lease(OTHER), ME, T0) is None
    assert release_body(None, ME, T0) is None
    assert decide(body, OTHER, T0 + 1, 15.0).action is Action.ACQUIRE  # a standby takes it at once


def test_defaults_namespace_and_identity(tmp_path: Any) -> None:
    sa = tmp_path / "namespace"
    sa.write_text("kubetune-system\n")
    assert default_namespace({"POD_NAMESPACE": "from-downward-api"}, str(sa)) == "from-downward-api"
    assert default_namespace({}, str(sa)) == "kubetune-system"
    assert default_namespace({}, str(tmp_path / "missing")) == "default"
    a, b = default_identity("pod-1"), default_identity("pod-1")
    assert a.startswith("pod-1_") and b.startswith("pod-1_") and a != b


def test_config_checks_durations() -> None:
    cfg = ElectionConfig(namespace="ops", identity=ME)
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (15.0, 10.0, 2.0)
    assert cfg.stop_grace == 3.0  # 15 - 10, less a retry period of margin
    for lease_duration, renew_deadline, retry_period in ((15.0, 15.0, 2.0), (15.0, 10.0, 10.0), (15.0, 10.0, 0.0)):
        with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
            ElectionConfig(namespace="ops", identity=ME, lease_duration=lease_duration,
                           renew_deadline=renew_deadline, retry_period=retry_period)


# ------------------------------------------------------------------------------------------ elector
class FakeLeases:
    """One Lease, stored like the API server does: POST fails on an existing name, PUT needs the current
    resourceVersion (else 409), every write bumps it. Each call yields to the loop first, so concurrent
    candidates interleave between their read and their write."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 0
        self.failure: Exception | None = None
        self.writes = 0

    async def _enter(self) -> None:
        await asyncio.sleep(0)
        if self.failure is not None:
            raise self.failure

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes += 1
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.obj)

    async def get(self, path: str, params: Any = None, *, timeout: float = 30.0) -> dict[str, Any] | None:
        await self._enter()
        return copy.deepcopy(self.obj)

    async def create(self, collection: str, obj: dict[str, Any], *,
                     timeout: float = 30.0) -> tuple[dict[str, Any], bool]:
        await self._enter()
        if self.obj is not None:
            return copy.deepcopy(self.obj), False
        return self._store(obj), True

    async def replace(self, path: str, obj: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
        await self._enter()
        if self.obj is None:
            raise KubeError(404, "NotFound", "gone", object_name="kubetune-operator")
        if obj["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified")
        return self._store(obj)


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def elector(store: FakeLeases, identity: str, clock: Clock | None = None, *, lease_duration: float = 15.0,
            renew_deadline: float = 10.0, retry_period: float = 2.0) -> LeaderElector:
    cfg = ElectionConfig(namespace="ops", identity=identity, lease_duration=lease_duration,
                         renew_deadline=renew_deadline, retry_period=retry_period)
    return LeaderElector(cast(Kube, store), cfg, clock=clock or Clock(T0))


def test_two_candidates_never_both_win() -> None:
    async def race() -> list[Outcome]:
        store, clock = FakeLeases(), Clock(T0)
        outcomes: list[Outcome] = []
        for i in range(20):  # a fresh Lease, then released and expired ones; each round read-read-write-write
            a, b = elector(store, f"{ME}-{i}", clock), elector(store, f"{OTHER}-{i}", clock)
            round_ = await asyncio.gather(a.try_acquire_or_renew(1.0), b.try_acquire_or_renew(1.0))
            assert sorted(o.value for o in round_) == ["failed", "leading"], round_
            outcomes += round_
            winner = a if round_[0] is Outcome.LEADING else b
            assert store.obj is not None and store.obj["spec"]["holderIdentity"] == winner.identity
            if len(outcomes) % 4:
                assert await winner.release()
            else:
                clock.now += 16
        return outcomes

    assert asyncio.run(race()).count(Outcome.LEADING) == 20


def test_standby_waits_for_expiry_then_takes_over_and_old_leader_steps_down() -> None:
    async def scenario() -> None:
        store, clock = FakeLeases(), Clock(T0)
        leader, standby = elector(store, ME, clock), elector(store, OTHER, clock)
        assert await leader.try_acquire_or_renew(1.0) is Outcome.LEADING
        clock.now += 14
        assert await standby.try_acquire_or_renew(1.0) is Outcome.FOLLOWING
        assert standby.holder == ME and 0.05 < standby.next_try_in() <= 1.06  # wakes as the term ends
        clock.now += 1
        assert await standby.try_acquire_or_renew(1.0) is Outcome.LEADING
        assert store.obj is not None and store.obj["spec"]["leaseTransitions"] == 1
        assert await leader.try_acquire_or_renew(1.0) is Outcome.FOLLOWING  # the old leader sees it lost
        assert not await leader.release()  # and must not clear the new holder
        assert store.obj["spec"]["holderIdentity"] == OTHER

    asyncio.run(scenario())


def test_keep_returns_when_the_lease_is_taken() -> None:
    async def scenario() -> None:
        store = FakeLeases()
        leader = elector(store, ME, lease_duration=1.0, renew_deadline=0.5, retry_period=0.02)
        assert await leader.acquire(asyncio.Event())
        keeper = asyncio.create_task(leader.keep())
        await asyncio.sleep(0.1)
        assert not keeper.done() and store.writes > 2  # renewing
        assert store.obj is not None
        store.obj["spec"]["holderIdentity"] = OTHER
        await asyncio.wait_for(keeper, 1.0)

    asyncio.run(scenario())


def test_keep_gives_up_after_the_renew_deadline_when_the_api_is_unreachable() -> None:
    async def scenario() -> float:
        store = FakeLeases()
        leader = elector(store, ME, lease_duration=1.0, renew_deadline=0.3, retry_period=0.05)
        assert await leader.acquire(asyncio.Event())
        store.failure = aiohttp.ClientConnectionError("connection refused")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(leader.keep(), 2.0)
        return loop.time() - t0

    elapsed = asyncio.run(scenario())
    assert 0.3 <= elapsed < 0.6, elapsed


def test_acquire_stops_when_asked() -> None:
    async def scenario() -> bool:
        store = FakeLeases()
        assert await elector(store, OTHER).try_acquire_or_renew(1.0) is Outcome.LEADING
        stop = asyncio.Event()
        waiting = asyncio.create_task(elector(store, ME, retry_period=0.05, renew_deadline=0.1,
                                              lease_duration=100.0).acquire(stop))
        await asyncio.sleep(0.2)
        stop.set()
        return await asyncio.wait_for(waiting, 1.0)

    assert asyncio.run(scenario()) is False


def test_lease_path() -> None:
    assert lease_path("ops", "kubetune-operator") == \
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/kubetune-operator"


# ------------------------------------------------------------------------------------------ health, flags
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_endpoints_follow_leadership_and_kopf() -> None:
    async def scenario() -> list[tuple[str, int, str]]:
        port, readiness = free_port(), Readiness()
        runner = await start_health_server(port, readiness, host="127.0.0.1")
        seen: list[tuple[str, int, str]] = []
        try:
            async with aiohttp.ClientSession() as session:
                async def probe(path: str) -> None:
                    async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                        seen.append((path, r.status, await r.text()))

                await probe("/healthz")
                await probe("/readyz")
                readiness.leading = True
                await probe("/readyz")  # leading, kopf not started yet
                readiness.kopf_started.set()
                await probe("/readyz")
                readiness.stopped()
                await probe("/readyz")
                await probe("/healthz")
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [("/healthz", 200, "ok"), ("/readyz", 503, "standby"),
                                       ("/readyz", 503, "standby"), ("/readyz", 200, "leader"),
                                       ("/readyz", 503, "standby"), ("/healthz", 200, "ok")]


def test_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "kubetune-system")
    cfg = election_config(parse_args([]))
    assert cfg is not None and cfg.namespace == "kubetune-system" and cfg.name == "kubetune-operator"
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (15.0, 10.0, 2.0)
    cfg = election_config(parse_args(["--leader-election-namespace", "ops", "--leader-election-id", "kt"]))
    assert cfg is not None and (cfg.namespace, cfg.name) == ("ops", "kt")
    assert election_config(parse_args(["--standalone"])) is None
    assert election_config(parse_args(["--no-leader-election"])) is None
    legacy = parse_args(["--peering", "kubetune", "--priority", "5"])  # deprecated, accepted, ignored
    assert election_config(legacy) is not None
    with pytest.raises(ValueError, match="renew deadline"):
        election_config(parse_args(["--renew-deadline", "20"]))
