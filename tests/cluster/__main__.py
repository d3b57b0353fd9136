"""CLI: python -m tests.cluster up|down|status|build|s3|prometheus|image BASE."""

from __future__ import annotations

import argparse
import json
import sys

from .system import HarnessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build if needed, start (or adopt) the cluster, S3 and Prometheus; idempotent")
    sub.add_parser("down", help="stop everything the harness started; safe after a crash")
    sub.add_parser("status", help="print what runs, as JSON")
    sub.add_parser("build", help="only build (or find cached) Kubernetes binaries")
    sub.add_parser("env", help="print export lines for KUBECONFIG and the S3 endpoint")
    sub.add_parser("is-up", help="exit 0 when this machine's harness cluster is running, 1 otherwise")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            from .cluster import up
            from .prometheus import ensure_prometheus
            from .s3 import ensure_s3

            info = up()
            s3 = ensure_s3()
            prom = ensure_prometheus()
            print(f"cluster ({info.kind}) up: KUBECONFIG={info.kubeconfig}")
            print(f"timings: {info.timings.summary()}")
            print(f"S3: {s3.host_endpoint} (pods: {s3.pod_endpoint}); Prometheus: {prom.url}")
            if not info.can_run_pods:
                print(f"note: e2e tests will skip: {info.reason_no_pods}")
        elif args.command == "down":
            from .cluster import down

            down()
            print("cluster down")
        elif args.command == "status":
            from .cluster import status

            print(json.dumps(status(), indent=2))
        elif args.command == "build":
            from .build import ensure_binaries

            path, seconds = ensure_binaries()
            print(f"{path} (built in {seconds:.0f}s)" if seconds else f"{path} (cached)")
        elif args.command == "is-up":
            from . import procs
            from .cluster import ClusterInfo

            current = ClusterInfo.load()
            return 0 if current and current.kind == "harness" and procs.is_running("kube-apiserver") else 1
        elif args.command == "env":
            from .cluster import ClusterInfo

            loaded = ClusterInfo.load()
            if not loaded:
                print("# cluster not up: python -m tests.cluster up", file=sys.stderr)
                return 1
            print(f"export KUBECONFIG={loaded.kubeconfig}")
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
