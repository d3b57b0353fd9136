"""Entry point: ``python -m kubetune.operator [--namespace NS ...] [--metrics-port N]`` (``kubetune-operator``).

Replicas elect a leader on a Lease (:mod:`.leader`); only the leader runs kopf, always without kopf's own
peering. ``--standalone`` (or ``--no-leader-election``) skips the election: the process is the only replica.
Exit codes: 0 after a normal stop, 1 when leadership was lost (the Deployment restarts the replica as a standby),
130 on Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import kopf

from kubetune.operator.context import Context
from kubetune.operator.handlers import QuietWatchHandlers, build_registry, connection_info
from kubetune.operator.health import Readiness, start_health_server
from kubetune.operator.kube import Kube, small_tls_read_buffers
from kubetune.operator.leader import (
    DEFAULT_LEASE_NAME,
    LEASE_DURATION,
    RENEW_DEADLINE,
    RETRY_PERIOD,
    ElectionConfig,
    LeaderElector,
    default_identity,
    default_namespace,
)
from kubetune.operator.metrics import Metrics
from kubetune.operator.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

EXIT_LOST_LEADERSHIP = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubetune-operator", description="The kubetune FinetuneRun operator (kopf).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="Watch this namespace (repeatable; globs like 'team-*' work). Default: all namespaces.")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="Watch the whole cluster (default).")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off).")
    p.add_argument("--health-port", type=int, default=8081,
                   help="Port of /healthz (alive) and /readyz (leading, kopf started) (0: off).")
    election = p.add_argument_group("leader election (a Lease; only the holder runs kopf)")
    election.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=True,
                          help="Elect a leader among replicas (default: on).")
    election.add_argument("--leader-election-namespace", default=None,
                          help="Namespace of the Lease. Default: $POD_NAMESPACE, else the service account's "
                               "namespace, else 'default'.")
    election.add_argument("--leader-election-id", default=DEFAULT_LEASE_NAME,
                          help=f"Name of the Lease (default: {DEFAULT_LEASE_NAME}).")
    election.add_argument("--lease-duration", type=float, default=LEASE_DURATION,
                          help="Seconds a standby waits after the leader's last renewal before taking over.")
    election.add_argument("--renew-deadline", type=float, default=RENEW_DEADLINE,
                          help="Seconds the leader keeps trying to renew before it gives up and exits.")
    election.add_argument("--retry-period", type=float, default=RETRY_PERIOD,
                          help="Seconds between renewals, and between a standby's tries.")
    p.add_argument("--standalone", action="store_true",
                   help="No leader election: this is the only replica (same as --no-leader-election).")
    # Accepted and ignored, so that manifests written for kopf peering still start.
    p.add_argument("--peering", default=None, help=argparse.SUPPRESS)
    p.add_argument("--priority", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    return p.parse_args(argv)


def election_config(args: argparse.Namespace) -> ElectionConfig | None:
    """None when this process runs without an election."""
    if args.standalone or not args.leader_election:
        return None
    return ElectionConfig(namespace=args.leader_election_namespace or default_namespace(),
                          name=args.leader_election_id, identity=default_identity(),
                          lease_duration=args.lease_duration, renew_deadline=args.renew_deadline,
                          retry_period=args.retry_period)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kopf.configure(debug=args.debug, verbose=args.verbose,
                   log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
                               "json": kopf.LogFormat.JSON}[args.log_format])
    if not (args.verbose or args.debug):
        logging.getLogger("kopf.objects").addFilter(QuietWatchHandlers())
    if args.peering is not None or args.priority is not None:
        log.warning("--peering and --priority are deprecated and ignored: replicas elect a leader on a Lease.")
    try:
        # A bad KUBETUNE_* value is the deployer's to fix: one line naming the variable, no traceback.
        settings = OperatorSettings.from_env()
        election = election_config(args)
    except ValueError as e:
        log.error(str(e))
        return 2
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    ctx = Context(settings=settings, metrics=metrics)
    log.info(f"kubetune operator: settings={settings}")
    small_tls_read_buffers()
    try:
        return asyncio.run(serve(args, ctx, build_registry(ctx), election))
    except KeyboardInterrupt:
        return 130


async def serve(args: argparse.Namespace, ctx: Context, registry: kopf.OperatorRegistry,
                election: ElectionConfig | None) -> int:
    halt = asyncio.Event()  # kopf's stop flag, and what ends a standby's wait
    _stop_on_signals(halt)
    readiness = Readiness()
    health = await start_health_server(args.health_port, readiness) if args.health_port else None
    try:
        if election is None:
            readiness.leading = True
            await run_kopf(args, ctx, registry, halt, readiness)
            return 0
        return await elect_and_run(args, ctx, registry, election, halt, readiness)
    finally:
        if health is not None:
            await health.cleanup()


async def run_kopf(args: argparse.Namespace, ctx: Context, registry: kopf.OperatorRegistry, halt: asyncio.Event,
                   readiness: Readiness) -> None:
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=args.all_namespaces or not args.namespace,
            namespaces=args.namespace,
            standalone=True,
            stop_flag=halt,
            ready_flag=readiness.kopf_started,
            memo=kopf.Memo(ctx=ctx),
        )
    finally:
        readiness.stopped()
        _stop_on_signals(halt)  # kopf's own handlers point at its finished run


async def elect_and_run(args: argparse.Namespace, ctx: Context, registry: kopf.OperatorRegistry,
                        election: ElectionConfig, halt: asyncio.Event, readiness: Readiness) -> int:
    kube = lease_client()
    elector = LeaderElector(kube, election)
    try:
        log.info(f"Leader election on Lease {election.namespace}/{election.name} as {election.identity}.")
        if not await elector.acquire(halt):
            return 0
        readiness.leading = True
        # Created before kopf starts, so that kopf, when it stops, leaves the renewal task alone.
        keeper = asyncio.create_task(elector.keep(), name="leader lease renewal")
        operator = asyncio.create_task(run_kopf(args, ctx, registry, halt, readiness), name="kopf operator")
        await asyncio.wait({keeper, operator}, return_when=asyncio.FIRST_COMPLETED)
        if not operator.done():
            _log_keeper_failure(keeper)
            readiness.stopped()
            halt.set()
            await stop_within(operator, election.stop_grace)
            return EXIT_LOST_LEADERSHIP
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await elector.release()
        operator.result()  # a kopf crash surfaces once the Lease is free
        return 0
    finally:
        await kube.close()


def lease_client() -> Kube:
    """A client of its own for the Lease, from the same login as kopf's; it does not retry by itself (the
    election retries every retry period and must notice a dead API server within the renew deadline)."""
    settings = kopf.OperatorSettings()
    info = connection_info(settings=settings)
    if info is None:
        raise SystemExit("leader election: no credentials (neither a service account nor a kubeconfig)")

    def relogin() -> None:
        fresh = connection_info(settings=settings)
        if fresh is not None:
            kube.update_credentials(fresh)

    kube = Kube.from_connection_info(info, relogin=relogin, retry_for=0.0)
    return kube


async def stop_within(operator: asyncio.Task[None], grace: float) -> None:
    """Wait for kopf to stop after the Lease was lost; past ``grace`` another replica may already lead, so the
    process exits at once rather than act beside it."""
    done, _ = await asyncio.wait({operator}, timeout=grace)
    if not done:
        log.error(f"kopf did not stop within {grace:.1f}s of losing the Lease; exiting now.")
        logging.shutdown()
        os._exit(EXIT_LOST_LEADERSHIP)
    if not operator.cancelled() and operator.exception() is not None:
        log.error(f"kopf failed while stopping: {operator.exception()!r}")


def _log_keeper_failure(keeper: asyncio.Task[None]) -> None:
    if keeper.done() and not keeper.cancelled() and keeper.exception() is not None:
        log.error(f"Lease renewal failed: {keeper.exception()!r}")
    log.error("Lost leadership: stopping kopf; the process exits for a restart as a standby.")


def _stop_on_signals(halt: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or not Unix
            loop.add_signal_handler(sig, halt.set)


if __name__ == "__main__":
    sys.exit(main())
