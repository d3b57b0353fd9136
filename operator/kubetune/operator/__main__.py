"""Entry point: ``python -m kubetune.operator [--namespace NS ...] [--metrics-port N]`` (``kubetune-operator``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf

from kubetune.operator.context import Context
from kubetune.operator.handlers import QuietWatchHandlers, build_registry
from kubetune.operator.metrics import Metrics
from kubetune.operator.settings import OperatorSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubetune-operator", description="The kubetune FinetuneRun operator (kopf).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="Watch this namespace (repeatable; globs like 'team-*' work). Default: all namespaces.")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="Watch the whole cluster (default).")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off).")
    p.add_argument("--health-port", type=int, default=8081, help="Liveness endpoint port, /healthz (0: off).")
    p.add_argument("--peering", default="kubetune",
                   help="kopf peering name for leader election between replicas. Used when the KopfPeering CRDs "
                        "(crds/kopf-peering.yaml) are installed; without them the operator runs alone.")
    p.add_argument("--standalone", action="store_true", help="No peering: this is the only replica.")
    p.add_argument("--priority", type=int, default=0, help="Peering priority of this replica.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = OperatorSettings.from_env()
    kopf.configure(debug=args.debug, verbose=args.verbose,
                   log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
                               "json": kopf.LogFormat.JSON}[args.log_format])
    if not (args.verbose or args.debug):
        logging.getLogger("kopf.objects").addFilter(QuietWatchHandlers())
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    ctx = Context(settings=settings, metrics=metrics, peering_name=args.peering)
    registry = build_registry(ctx)
    clusterwide = args.all_namespaces or not args.namespace
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    logging.getLogger(__name__).info(f"kubetune operator: settings={settings}")
    try:
        asyncio.run(kopf.operator(
            registry=registry,
            clusterwide=clusterwide,
            namespaces=args.namespace,
            standalone=args.standalone or None,
            priority=args.priority,
            liveness_endpoint=liveness,
            memo=kopf.Memo(ctx=ctx),
        ))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
