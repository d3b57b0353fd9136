"""Leader takeover bench: two operator replicas electing a leader on a Lease, on the harness cluster.

    python -m bench.ha_takeover [--kills 5] [--json bench/results/ha-takeover.json]

Both replicas run as subprocesses (``python -m kubetune.operator --namespace NS --leader-election-namespace NS``,
the default durations: lease 15 s, renew deadline 10 s, retry 2 s). Each round waits for one replica ready
(/readyz 200) and the other standing by (503), SIGKILLs the leader, and polls the standby's /readyz every 50 ms:
the takeover time is from the kill to that 200 (the Lease's expiry, the standby's next try, kopf's start). A fresh
replica then replaces the killed one as the next standby. Also recorded: how old the leader's last renewal was at
the kill (takeover ≈ lease duration − that age + kopf's start), and the machine's load average before and after.

Uses the cluster from ``KUBECONFIG`` or the harness (``python -m tests.cluster up``). Deletes its namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.operator_scale import percentile  # noqa: E402 - after the path setup, like the bench above

LEASE = "kubetune-operator"


def summarize(takeovers: list[float]) -> dict[str, float | None]:
    """p50 and max of the takeover times (seconds, 2 decimals)."""
    p50 = percentile(takeovers, 50)
    return {"takeover_p50_s": None if p50 is None else round(p50, 2),
            "takeover_max_s": round(max(takeovers), 2) if takeovers else None}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, namespace: str, env: dict[str, str], log_path: Path) -> None:
        self.health_port = free_port()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune.operator", "--namespace", namespace,
                 "--leader-election-namespace", namespace, "--metrics-port", "0",
                 "--health-port", str(self.health_port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def readyz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_split(replicas: list[Replica], timeout: float) -> tuple[Replica, Replica]:
    """(leader, standby) once exactly one answers /readyz 200 and the other 503."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [r.readyz() for r in replicas]
        if sorted(c or 0 for c in codes) == [200, 503]:
            leader = replicas[codes.index(200)]
            return leader, replicas[1 - replicas.index(leader)]
        time.sleep(0.1)
    raise SystemExit(f"no leader and standby within {timeout}s: /readyz answers {[r.readyz() for r in replicas]}")


def renew_age(coordination: Any, namespace: str) -> float:
    """Seconds since the Lease's last renewal (API server time as the holder wrote it, this machine's clock)."""
    spec = coordination.read_namespaced_lease(LEASE, namespace).spec
    return -1.0 if spec.renew_time is None else time.time() - spec.renew_time.timestamp()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a takeover may take before the bench fails")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    from kubernetes import client, config

    from tests.cluster.cluster import ClusterInfo, up
    from tests.cluster.objects import delete_namespace

    kubeconfig = os.environ.get("KUBECONFIG") or (ClusterInfo.load() or up()).kubeconfig
    api_client = config.new_client_from_config(config_file=kubeconfig)
    core, coordination = client.CoreV1Api(api_client), client.CoordinationV1Api(api_client)
    env = {**os.environ, "KUBECONFIG": kubeconfig, "KUBETUNE_S3_SECRET": ""}
    subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds" / "finetunerun.yaml")], env=env, check=True,
                   capture_output=True)
    ns = f"bench-ha-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    log_path = Path(f"/tmp/kubetune-bench-{ns}.log")
    results: dict[str, Any] = {"kills": args.kills, "namespace": ns, "cpus": os.cpu_count(),
                               "lease_duration_s": 15, "renew_deadline_s": 10, "retry_period_s": 2,
                               "load_before": load_average()}
    replicas = [Replica(ns, env, log_path) for _ in range(2)]
    takeovers: list[float] = []
    ages: list[float] = []
    try:
        for _ in range(args.kills):
            leader, standby = wait_split(replicas, args.timeout)
            ages.append(round(renew_age(coordination, ns), 2))
            killed = time.monotonic()
            leader.kill()
            while standby.readyz() != 200:
                if time.monotonic() - killed > args.timeout:
                    raise SystemExit(f"no takeover within {args.timeout}s; see {log_path}")
                time.sleep(0.05)
            takeovers.append(round(time.monotonic() - killed, 2))
            print(json.dumps({"takeover_s": takeovers[-1], "renew_age_at_kill_s": ages[-1]}), flush=True)
            replicas = [standby, Replica(ns, env, log_path)]
        results["takeovers_s"] = takeovers
        results["renew_age_at_kill_s"] = ages
        results.update(summarize(takeovers))
        results["load_after"] = load_average()
    finally:
        for replica in replicas:
            replica.kill()
        delete_namespace(api_client, ns)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
