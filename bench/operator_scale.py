"""Operator scale bench: N concurrent FinetuneRuns with the stand-in trainer on the harness cluster.

    python -m bench.operator_scale --runs 100 --steps 30 --pace 1.0 [--json out.json]
    python -m bench.operator_scale --simulated --runs 2000 --steps 60 --pace 5 [--json out.json]

``--simulated``: the trainer pods run on simulated kubelets (:mod:`tests.cluster.simkubelet`, one node per 1,000
pods, started by the bench) instead of the harness's one real node, so every run has a running, logging pod
whatever N: the runs select and tolerate ``kubetune.io/simulated``, and their logs go API server → simulated
kubelet exactly as to a real one. The simulated trainer emits the real trainer's events (a progress event and a
human line every ``--pace`` seconds). The bench also reports the simulated kubelets' and the API server's CPU,
the operator's API requests per second, log-open errors, and lost final states (a finished run whose status
does not show its stream's last progress step and artifact).

Measures, with the operator running as a subprocess (``python -m kubetune.operator --namespace NS``):

- apply → Job created: from the create call returning to the Job appearing in a watch (p50/p99);
- trainer event → status, measured by the bench itself: for every progress event in every trainer pod's log
  (the kubelet's timestamp of the line), the time until a FinetuneRun watch event shows that step (or a later
  one: patches coalesce) in ``status.progress`` — what a user watching the run sees (p50/p99/max);
- the operator's own ``kubetune_status_lag_seconds`` histogram (log line → status patch accepted; p50/p99 read
  from bucket bounds, so they are upper bounds);
- the operator's peak RSS (VmHWM) and CPU time;
- duplicate Jobs (two Jobs for one run's attempt, or more Jobs than the run's recorded attempts): must be 0;
- how many pods ran / stayed Pending (the node runs what it can; ``KUBETUNE_MAX_PODS`` raises the kubelet's
  limit when the harness starts the cluster);
- with ``--restart-after S``: the operator is SIGKILLed S seconds after the last create and started again; the
  bench counts status regressions (a run's ``progress.step`` going down for the same pod, as the run watch sees
  it: must be 0) and the status write rate after the restart (run watch events per second, max over 1 s windows:
  every write to the objects, kopf's own included, as the watch delivers them) and the operator's own status
  patches per second (its ``kubetune_status_patches_total`` sampled every second: max and mean over the minute
  after the restart, against the ``--status-qps`` bucket).

Uses the cluster from ``KUBECONFIG`` or the harness (``python -m tests.cluster up``). Deletes its namespace.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetuneruns"
SIMULATED = "kubetune.io/simulated"
MIN_AVAILABLE_MB = 3072
IMAGE = "kubetune/standin:test"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def histogram_quantile(text: str, name: str, q: float) -> tuple[float | None, int]:
    """Upper bucket bound holding the q-quantile of a Prometheus histogram, and the count."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets:
        return None, 0
    buckets.sort()
    total = buckets[-1][1]
    for bound, count in buckets:
        if total and count >= q / 100 * total:
            return bound, int(total)
    return None, int(total)


def progress_lags(seen: dict[str, list[tuple[float, str | None, int]]],
                   logs: dict[str, list[tuple[str, float, int]]]) -> list[float]:
    """Seconds from each progress event (pod, kubelet timestamp, step) of a run to the first status, seen
    through the watch at that time or later, that names the same pod and at least that step. Pure.

    ``seen[run]``: (wall time, status.podName, progress.step) from the watch, in order; ``logs[run]``: the
    trainer pods' progress events."""
    lags: list[float] = []
    for run, events in logs.items():
        observed = seen.get(run, [])
        for pod, stamp, step in events:
            first = next((t for t, p, s in observed if p == pod and s >= step and t >= stamp), None)
            if first is not None:
                lags.append(first - stamp)
    return lags


def log_progress(text: str) -> list[tuple[float, int]]:
    """(kubelet timestamp, step) of each progress event in a ``timestamps=true`` pod log."""
    from kubetune.api.events import parse_line
    from kubetune.lifecycle.formats import parse_rfc3339
    from kubetune.operator.kube import split_log_line

    out: list[tuple[float, int]] = []
    for raw in text.splitlines():
        stamp, line = split_log_line(raw)
        event = parse_line(line)
        t = parse_rfc3339(stamp) if stamp else None
        if event is not None and event.type == "progress" and t is not None and isinstance(event.step, int):
            out.append((t, event.step))
    return out


def operator_ready(port: int) -> bool:
    """``/readyz`` answers 200 once kopf runs; an operator without it (a reference revision from before leader
    election: 404) is ready when kopf's own ``/healthz`` answers."""
    for path in ("/readyz", "/healthz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                return True
        except urllib.error.HTTPError as e:
            if e.code != 404:
                return False
        except OSError:
            return False
    return False


def status_regressions(seen: dict[str, list[tuple[float, str | None, int]]]) -> int:
    """Runs whose ``progress.step`` went down while the same pod was followed (a replay after a restart)."""
    regressed = 0
    for observations in seen.values():
        last: dict[str | None, int] = {}
        for _, pod, step in sorted(observations):
            if step < last.get(pod, -1):
                regressed += 1
                break
            last[pod] = step
    return regressed


def max_rate(times: list[float], start: float, window: float) -> int:
    """The most events in one 1-second bucket of [start, start + window)."""
    buckets: dict[int, int] = {}
    for t in times:
        if start <= t < start + window:
            buckets[int(t - start)] = buckets.get(int(t - start), 0) + 1
    return max(buckets.values(), default=0)


def counter_value(text: str, name: str) -> float | None:
    """The value of an unlabelled counter in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def counter_rates(samples: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, increase per second) between consecutive (time, counter) samples; a counter that went down was
    reset (a restarted process), so its new value is the increase."""
    rates = []
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t1 > t0:
            rates.append((t1, (v1 - v0 if v1 >= v0 else v1) / (t1 - t0)))
    return rates


def labelled_counters(text: str, name: str) -> dict[str, float]:
    """The samples of a labelled counter in a Prometheus exposition, by their label set's text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels] = float(value)
    return out


def lost_final_states(items: list[dict[str, Any]], steps: int) -> list[str]:
    """Succeeded runs whose status does not show what their trainer's stream ended with: the last step and the
    artifact."""
    lost = []
    for item in items:
        status = item.get("status") or {}
        if status.get("phase") == "Succeeded" and (
                (status.get("progress") or {}).get("step") != steps or not (status.get("artifact") or {}).get("uri")):
            lost.append(item["metadata"]["name"])
    return lost


def _pid_of(component: str) -> int | None:
    from tests.cluster import procs

    try:
        return procs.pid_of(component)
    except Exception:  # a cluster the harness did not start
        return None


def memory_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pace", type=float, default=1.0, help="seconds between trainer steps")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--status-qps", type=float, default=50.0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the namespace")
    p.add_argument("--restart-after", type=float, default=None,
                   help="SIGKILL and restart the operator this many seconds after the last create")
    p.add_argument("--simulated", action="store_true", help="trainer pods on simulated kubelets")
    args = p.parse_args(argv)

    from kubernetes import client, config, watch

    from tests.cluster.cluster import ClusterInfo, up
    from tests.cluster.objects import delete_namespace
    from tests.cluster.simkubelet import SimulatedKubeletsProcess

    kubeconfig = os.environ.get("KUBECONFIG")
    info = ClusterInfo.load() if not kubeconfig else None
    if not kubeconfig:
        info = info or up()
        kubeconfig = info.kubeconfig
    if info is not None and info.can_run_pods and not args.simulated:
        info.build_image(IMAGE, ROOT / "tests" / "images" / "standin", build_args={"BASE_IMAGE": info.base_image})
    api_client = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds" / "finetunerun.yaml")], env=env, check=True,
                   capture_output=True)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    metrics_port, health_port = 18980, 18981
    log_path = Path(f"/tmp/kubetune-bench-{ns}.log")
    op_env = {**env, "KUBETUNE_TRAINER_IMAGE": IMAGE, "KUBETUNE_IMAGE_PULL_POLICY": "Never",
              "KUBETUNE_S3_SECRET": "", "KUBETUNE_STATUS_QPS": str(args.status_qps),
              # stand-in pods write nothing; the 20Gi default would cap the node at a dozen pods
              "KUBETUNE_EPHEMERAL_STORAGE": "256Mi"}

    def start_operator() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "kubetune.operator", "--namespace", ns, "--standalone",
                                     "--metrics-port", str(metrics_port), "--health-port", str(health_port)],
                                    stdout=log, stderr=subprocess.STDOUT, env=op_env, cwd=str(ROOT))

    sim: SimulatedKubeletsProcess | None = None
    if args.simulated:
        sim = SimulatedKubeletsProcess(kubeconfig, nodes=-(-args.runs // 1000), prefix=f"sim-{ns}").start()
    apiserver_pid = _pid_of("kube-apiserver")
    apiserver_cpu0 = cpu_seconds(apiserver_pid) if apiserver_pid else None
    operator = start_operator()
    results: dict[str, Any] = {"runs": args.runs, "steps": args.steps, "pace_s": args.pace, "namespace": ns,
                               "simulated": args.simulated, "loadavg_at_start": os.getloadavg()}
    job_seen: dict[str, float] = {}
    job_names: dict[str, list[str]] = {}
    stop = threading.Event()

    def watch_jobs() -> None:
        w = watch.Watch()
        while not stop.is_set():
            try:
                for ev in w.stream(batch.list_namespaced_job, ns, label_selector="kubetune.io/run",
                                   timeout_seconds=5):
                    job = ev["object"]
                    run = job.metadata.labels["kubetune.io/run"]
                    names = job_names.setdefault(run, [])
                    if job.metadata.name not in names:
                        names.append(job.metadata.name)
                    job_seen.setdefault(run, time.monotonic())
                    if stop.is_set():
                        break
            except Exception:  # a bench keeps watching
                time.sleep(0.5)

    seen: dict[str, list[tuple[float, str | None, int]]] = {}
    run_events: list[float] = []  # when the run watch saw each MODIFIED event (status writes, mostly)

    def watch_runs() -> None:
        w = watch.Watch()
        while not stop.is_set():
            try:
                for ev in w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                                   timeout_seconds=5):
                    now = time.time()
                    obj = ev["object"]
                    if ev["type"] == "MODIFIED":
                        run_events.append(now)
                    status = obj.get("status") or {}
                    step = (status.get("progress") or {}).get("step")
                    if isinstance(step, int):
                        seen.setdefault(obj["metadata"]["name"], []).append((now, status.get("podName"), step))
                    if stop.is_set():
                        break
            except Exception:  # a bench keeps watching
                time.sleep(0.5)

    patch_samples: list[tuple[float, float]] = []  # (time, kubetune_status_patches_total)

    def sample_patches() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
                    value = counter_value(r.read().decode(), "kubetune_status_patches_total")
                if value is not None:
                    patch_samples.append((time.time(), value))
            except (OSError, urllib.error.URLError):
                pass  # the operator is restarting
            stop.wait(1.0)

    peak_rss = 0.0
    try:
        deadline = time.monotonic() + 30
        while not operator_ready(health_port):
            if time.monotonic() > deadline or operator.poll() is not None:
                raise SystemExit(f"operator did not start; see {log_path}")
            time.sleep(0.2)
        for target in (watch_jobs, watch_runs, sample_patches):
            threading.Thread(target=target, daemon=True).start()
        time.sleep(1)
        created: dict[str, float] = {}
        t_start = time.monotonic()
        create_retries: list[int] = []  # HTTP status of each create the API server did not answer with success

        def create(i: int) -> None:
            name = f"run-{i:04d}"
            resources: dict[str, Any] = {"gpus": 0, "cpu": "1m", "memory": "16Mi"}
            if args.simulated:
                resources["nodeSelector"] = {SIMULATED: "true"}
                resources["tolerations"] = [{"key": SIMULATED, "operator": "Exists", "effect": "NoSchedule"}]
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneRun", "metadata": {"name": name},
                    "spec": {"data": {"train": "s3://bench/train.csv"}, "training": {"epochs": 3},
                             "model": {"config": {"standin": {"steps": args.steps, "pace": args.pace,
                                                              "noise_lines": 1}}},
                             "resources": resources}}
            for _ in range(10):
                try:
                    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
                    break
                except client.ApiException as e:
                    if e.status == 409:  # an earlier try's answer was lost, but it was created
                        break
                    if e.status not in (429, 500, 503, 504):
                        raise
                    create_retries.append(e.status)  # the API server is overloaded: that is a finding
                    time.sleep(1.0)
            created[name] = time.monotonic()

        # A platform's users apply their runs concurrently: 8 at a time.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.runs)))
        results["create_all_s"] = round(time.monotonic() - t_start, 2)
        results["create_retries"] = {str(code): create_retries.count(code) for code in sorted(set(create_retries))}
        restarted_at: float | None = None
        samples: list[dict[str, Any]] = []
        finished = 0
        def phase_counts(response: Any) -> dict[str, int]:
            counts: dict[str, int] = {}
            for item in json.loads(response.data)["items"]:
                phase = (item.get("status") or {}).get("phase") or "None"
                counts[phase] = counts.get(phase, 0) + 1
            return counts

        while time.monotonic() - t_start < args.timeout:
            # Every 5 s, raw JSON (no client-side models): the bench must not load the machine it measures, nor
            # hold the GIL long enough to delay the watch threads' timestamps.
            time.sleep(5)
            if args.restart_after is not None and restarted_at is None and (
                    time.monotonic() - t_start - results["create_all_s"] >= args.restart_after):
                operator.kill()
                operator.wait()
                restarted_at = time.time()
                operator = start_operator()
                print(json.dumps({"restart": "operator SIGKILLed and started again"}), flush=True)
            rss, peak_rss = rss_mb(operator.pid)
            available = memory_available_mb()
            if available < MIN_AVAILABLE_MB:
                # The API server and etcd grow without bound under a load they cannot serve: stop before the
                # kernel's OOM killer picks a victim, and say so.
                results["aborted"] = f"machine memory available fell to {available:.0f} MB"
                print(json.dumps({"aborted": results["aborted"]}), flush=True)
                break
            try:
                phases = phase_counts(custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                                           _preload_content=False))
                pod_phases = phase_counts(core.list_namespaced_pod(ns, _preload_content=False))
            except client.ApiException as e:  # an overloaded API server: sample again in 5 s
                print(json.dumps({"sample_failed": e.status}), flush=True)
                continue
            samples.append({"t": round(time.monotonic() - t_start, 1), "rss_mb": round(rss, 1), "runs": phases,
                            "pods": pod_phases})
            print(json.dumps(samples[-1]), flush=True)
            finished = phases.get("Succeeded", 0) + phases.get("Failed", 0)
            if finished >= args.runs:
                break
        results["wall_s"] = round(time.monotonic() - t_start, 1)
        results["finished"] = finished
        results["max_running_pods"] = max((s["pods"].get("Running", 0) for s in samples), default=0)
        results["max_pending_pods"] = max((s["pods"].get("Pending", 0) for s in samples), default=0)
        stop.set()
        latencies = [job_seen[n] - created[n] for n in created if n in job_seen]
        results["apply_to_job_p50_s"] = round(percentile(latencies, 50) or -1, 3)
        results["apply_to_job_p99_s"] = round(percentile(latencies, 99) or -1, 3)
        results["apply_to_job_max_s"] = round(max(latencies, default=-1), 3)
        results["apply_to_job_mean_s"] = round(statistics.fmean(latencies), 3) if latencies else None
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            exposition = r.read().decode()
        logs: dict[str, list[tuple[str, float, int]]] = {}
        pods_now: list[Any] = core.list_namespaced_pod(ns, label_selector="kubetune.io/run").items
        for pod in pods_now:
            run, pod_name = pod.metadata.labels["kubetune.io/run"], str(pod.metadata.name)
            try:
                text = core.read_namespaced_pod_log(pod_name, ns, container="trainer", timestamps=True)
            except client.ApiException:
                continue
            logs.setdefault(run, []).extend((pod_name, t, step) for t, step in log_progress(text))
        lags = progress_lags(seen, logs)
        results["progress_events"] = len(lags)
        for q in (50, 90, 99):
            results[f"event_to_status_p{q}_s"] = round(percentile(lags, q) or -1, 3)
        results["event_to_status_max_s"] = round(max(lags, default=-1), 3)
        for q in (50, 99):
            bound, count = histogram_quantile(exposition, "kubetune_status_lag_seconds", q)
            results[f"status_lag_p{q}_le_s"] = bound
            results["status_lag_events"] = count
            results[f"log_delivery_p{q}_le_s"] = histogram_quantile(exposition, "kubetune_log_delivery_seconds", q)[0]
        results["operator_peak_rss_mb"] = round(peak_rss, 1)
        results["operator_cpu_s"] = round(cpu_seconds(operator.pid), 1)
        results["operator_cpu_cores"] = round(results["operator_cpu_s"] / results["wall_s"], 2)
        if sim is not None:
            results["simulated_kubelets_cpu_cores"] = round(cpu_seconds(sim.pid) / results["wall_s"], 2)
        if apiserver_pid and apiserver_cpu0 is not None:
            results["apiserver_cpu_cores"] = round((cpu_seconds(apiserver_pid) - apiserver_cpu0) / results["wall_s"], 2)
        requests = labelled_counters(exposition, "kubetune_api_requests_total")
        results["operator_api_requests_per_s"] = round(sum(requests.values()) / results["wall_s"], 1)
        results["operator_api_requests"] = requests
        results["log_open_errors"] = counter_value(exposition, "kubetune_log_open_errors_total")
        patches = counter_value(exposition, "kubetune_status_patches_total") or 0.0
        results["status_patches"] = patches
        results["patches_per_run_per_5s"] = round(patches / args.runs / (results["wall_s"] / 5), 3)
        results["load_avg_at_end"] = os.getloadavg()
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]  # type: ignore[index]
        attempts = {i["metadata"]["name"]: int((i.get("status") or {}).get("attempts") or 0) for i in items}
        duplicates = 0
        for run, names in job_names.items():
            if len(names) != len(set(names)) or len(names) > max(1, attempts.get(run, 0)):
                duplicates += 1
        results["duplicate_jobs"] = duplicates
        results["lost_final_states"] = sorted(lost_final_states(items, args.steps))
        results["status_regressions"] = status_regressions(seen)
        if restarted_at is not None:
            results["restarted_after_creates_s"] = args.restart_after
            results["status_writes_per_s_max_after_restart"] = max_rate(run_events, restarted_at, 60.0)
            results["status_writes_per_s_max_before_restart"] = max_rate(run_events, restarted_at - 60.0, 60.0)
            after = [rate for t, rate in counter_rates(patch_samples) if restarted_at <= t < restarted_at + 60.0]
            results["operator_patches_per_s_max_after_restart"] = round(max(after, default=0.0), 1)
            results["operator_patches_per_s_mean_after_restart"] = round(statistics.fmean(after), 1) if after else None
            results["status_qps"] = args.status_qps
        results["jobs"] = sum(len(v) for v in job_names.values())
    finally:
        stop.set()
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
        if not args.keep:
            delete_namespace(api_client, ns)  # while the simulated kubelets still remove their pods
        if sim is not None:
            sim.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
