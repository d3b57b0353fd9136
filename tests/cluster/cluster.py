"""Bring a real one-machine Kubernetes up and down, or adopt an existing one.

Three kinds, chosen by the environment:
- ``kubeconfig``: ``KUBECONFIG`` points at a cluster (kind, k3d, a real one): nothing is built or started.
- ``kubebuilder``: ``KUBEBUILDER_ASSETS`` holds etcd + kube-apiserver (the envtest convention): the harness
  starts a control plane only; e2e tests (which need pods) skip with that reason.
- ``harness`` (default): Kubernetes v1.20.2 built from Debian's source package (build.py), started with
  dockerd, etcd, the control plane, the kubelet (dockershim) and kube-proxy.

``up`` is idempotent (it starts only what is not running and waits for readiness); ``down`` stops
everything it started, removes pod containers and unmounts kubelet mounts, and is safe after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import procs
from .build import cached_binaries, ensure_binaries
from .paths import DOCKER_ROOT, K8S_VERSION, state_dir
from .pki import Pki, ensure_pki, write_kubeconfig
from .system import (
    HarnessError,
    ensure_free_space,
    ensure_packages,
    free_gb,
    host_ip,
    is_root,
    run,
    tail,
    wait_for,
)

APISERVER_PORT = int(os.environ.get("KUBETUNE_APISERVER_PORT", "6443"))
ETCD_PORT = int(os.environ.get("KUBETUNE_ETCD_PORT", "2379"))
ETCD_PEER_PORT = int(os.environ.get("KUBETUNE_ETCD_PEER_PORT", "2380"))
KUBELET_ROOT = Path("/var/lib/kubetune-kubelet")
MIN_STATE_FREE_GB = 1.0  # etcd's WAL and the daemons' logs
MIN_DOCKER_FREE_GB = 3.0  # pod containers and their logs (image builds check for themselves)
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
# Ordered: `down` stops them in reverse.
COMPONENTS = ("dockerd", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
              "kube-proxy")


@dataclass
class Timings:
    build_s: float = 0.0
    start_s: float = 0.0
    node_ready_s: float = 0.0
    images_s: float = 0.0

    def summary(self) -> str:
        return (f"build {self.build_s:.1f}s, start {self.start_s:.1f}s, node Ready after "
                f"{self.node_ready_s:.1f}s, base images {self.images_s:.1f}s")


@dataclass
class ClusterInfo:
    kind: str
    kubeconfig: str
    host_ip: str
    can_run_pods: bool
    reason_no_pods: str = ""
    timings: Timings = field(default_factory=Timings)

    @property
    def base_image(self) -> str:
        from .images import BASE_IMAGE

        return BASE_IMAGE

    def build_image(self, tag: str, context: Path | str, dockerfile: Path | str | None = None,
                    build_args: dict[str, str] | None = None, wheels_for: tuple[str, ...] = ()) -> float:
        """Build a local image the kubelet can run with imagePullPolicy: Never; returns seconds taken."""
        if not self.can_run_pods:
            raise HarnessError(f"cannot build images for this cluster: {self.reason_no_pods}")
        from .images import build_image

        return build_image(tag, Path(context), Path(dockerfile) if dockerfile else None,
                           build_args=build_args, wheels_for=wheels_for)

    def save(self) -> None:
        (state_dir() / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> ClusterInfo | None:
        path = state_dir() / "cluster.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["timings"] = Timings(**raw.get("timings", {}))
        return cls(**raw)


def node_name() -> str:
    return socket.gethostname().lower()


def _api_ready(kubeconfig: Path) -> bool:
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
    return out.returncode == 0 and out.stdout.strip() == "ok"


def _node_ready(kubeconfig: Path, name: str) -> bool:
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "node", name, "-o",
                          "jsonpath={.status.conditions[?(@.type=='Ready')].status}"], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10)
    return out.stdout.strip() == "True"


def _http_ok(url: str, ca: Path | None = None) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
        return bool(resp.status == 200)


def _fail_with_log(name: str, what: str) -> HarnessError:
    """The daemon's failure with what is known of it: how it ended, the free disk space when that is low (a
    full disk leaves an empty log), and the last lines of its log."""
    ended = procs.exit_status(name)
    free = free_gb(state_dir())
    detail = "".join([f" ({ended})" if ended else "",
                      f"; only {free:.2f} GB free on {state_dir()}" if free < MIN_STATE_FREE_GB else ""])
    return HarnessError(f"{name} failed to {what}{detail}; last lines of {procs.log_file(name)}:\n"
                        f"{tail(procs.log_file(name), 20)}")


def _start_checked(name: str, argv: list[str], ready: Callable[[], object], timeout: float,
                   what: str = "start") -> None:
    procs.start(name, argv)

    def check() -> bool:
        if not procs.is_running(name):
            raise _fail_with_log(name, what)
        return bool(ready())

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except HarnessError:
            raise
        except Exception:
            pass
        time.sleep(0.5)
    raise _fail_with_log(name, f"{what} within {timeout:.0f}s")


# ------------------------------------------------------------------------------------------ components
def start_dockerd() -> None:
    if procs.is_running("dockerd"):
        return
    with contextlib.suppress(Exception):
        if run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=10).returncode == 0:
            return  # a Docker engine someone else runs: use it, never stop it
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise HarnessError("dockerd not found: apt-get install docker.io")
    _start_checked("dockerd", [dockerd, "--host", "unix:///var/run/docker.sock"],
                   lambda: run(["docker", "info"], check=False, timeout=10).returncode == 0, 60)


def start_control_plane(bin_dir: Path, etcd: str, root: Path, ip: str) -> Path:
    """etcd + kube-apiserver; returns the admin kubeconfig."""
    pki = ensure_pki(root / "pki", ip, node_name())
    admin_kubeconfig = write_kubeconfig(root / "admin.kubeconfig", f"https://{ip}:{APISERVER_PORT}",
                                        pki.ca_crt, pki.token("admin"), "admin")
    if not procs.is_running("etcd"):
        # A control plane that is not running (a fresh machine, or one whose session ended without `down`)
        # starts from an empty etcd: no runs, namespaces or finalizers left over from earlier test runs.
        shutil.rmtree(root / "etcd", ignore_errors=True)
    (root / "etcd").mkdir(exist_ok=True)
    _start_checked("etcd", [etcd, "--data-dir", str(root / "etcd"),
                            "--listen-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                            "--advertise-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
                            "--initial-cluster", f"default=http://127.0.0.1:{ETCD_PEER_PORT}"],
                   lambda: _http_ok(f"http://127.0.0.1:{ETCD_PORT}/health"), 30)
    _start_checked("kube-apiserver", apiserver_argv(bin_dir, pki, ip), lambda: _api_ready(admin_kubeconfig), 90)
    return admin_kubeconfig


def apiserver_argv(bin_dir: Path, pki: Pki, ip: str) -> list[str]:
    """The kube-apiserver command line (one place: `up` starts it with this, `restart_apiserver` restarts it)."""
    return [
        str(bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
        f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc", "--service-cluster-ip-range=10.96.0.0/16",
        f"--secure-port={APISERVER_PORT}", f"--tls-cert-file={pki.serving_crt}",
        f"--tls-private-key-file={pki.serving_key}", f"--token-auth-file={pki.token_file}",
        "--authorization-mode=Node,RBAC", "--allow-privileged=true", f"--advertise-address={ip}",
        "--bind-address=0.0.0.0", "--enable-priority-and-fairness=false",
    ]


@dataclass(frozen=True)
class ApiserverRestart:
    """Wall-clock times (``time.time()``) of one :func:`restart_apiserver`."""

    stop_requested: float  # SIGTERM sent
    stopped: float  # the process is gone: the API is down from here
    started: float  # the new process was started
    ready: float  # /readyz answers "ok" again

    @property
    def downtime_s(self) -> float:
        """From SIGTERM to /readyz answering again (what a client sees as the outage, at most)."""
        return self.ready - self.stop_requested

    @property
    def startup_s(self) -> float:
        """From the new process's start to /readyz."""
        return self.ready - self.started


def restart_apiserver(down_seconds: float = 5.0, *, grace_seconds: float = 5.0,
                      ready_timeout: float = 90.0) -> ApiserverRestart:
    """Stop the harness's kube-apiserver (SIGTERM; SIGKILL after ``grace_seconds``: with watches and log streams
    open it stops listening at once but does not exit by itself for a long time), keep it stopped ``down_seconds``,
    start it again with exactly the arguments it ran with, and wait until /readyz answers.

    Only for a cluster this harness started (kind ``harness``): it refuses (HarnessError) for ``kubeconfig`` and
    ``kubebuilder`` clusters, when the API server does not run, and when the running one's command line is not
    what :func:`apiserver_argv` builds (started by something else). etcd keeps all state. Holds the machine lock
    throughout, so a concurrent ``up`` waits instead of starting a second API server meanwhile."""
    with procs.machine_lock():
        info = ClusterInfo.load()
        if info is None or info.kind != "harness":
            raise HarnessError(f"restart_apiserver acts only on the harness's own cluster, not on "
                               f"{info.kind if info else 'no cluster'!r}")
        pid = procs.pid_of("kube-apiserver")
        bin_dir = cached_binaries()
        if pid is None or bin_dir is None:
            raise HarnessError("the harness's kube-apiserver is not running (python -m tests.cluster up)")
        root = state_dir()
        argv = apiserver_argv(bin_dir, Pki(root / "pki"), info.host_ip)
        running = [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]
        if running != argv:
            raise HarnessError(f"kube-apiserver (pid {pid}) runs with other arguments than the harness's: {running}")
        kubeconfig = Path(info.kubeconfig)
        stop_requested = time.time()
        procs.stop("kube-apiserver", timeout=grace_seconds)
        stopped = time.time()
        time.sleep(down_seconds)
        started = time.time()
        _start_checked("kube-apiserver", argv, lambda: _api_ready(kubeconfig), ready_timeout, what="restart")
        return ApiserverRestart(stop_requested, stopped, started, time.time())


def start_controllers(bin_dir: Path, root: Path, kubeconfig: Path) -> None:
    pki_dir = root / "pki"
    procs.start("kube-controller-manager", [
        str(bin_dir / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
        f"--service-account-private-key-file={pki_dir / 'sa.key'}", f"--root-ca-file={pki_dir / 'ca.crt'}",
        "--use-service-account-credentials=true", "--leader-elect=false",
        "--controllers=*,-csrsigning,-csrapproving,-csrcleaner",
        # The default 20 requests/s makes the Job controller the bottleneck of the scale bench's thousands of
        # Jobs (a pod create and two Job status writes each); managed control planes run with more.
        "--kube-api-qps=200", "--kube-api-burst=400",
    ])
    procs.start("kube-scheduler", [str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
                                   "--leader-elect=false", "--kube-api-qps=200", "--kube-api-burst=400"])


def start_node(bin_dir: Path, root: Path, ip: str) -> None:
    pki = Pki(root / "pki")
    name = node_name()
    kubelet_kubeconfig = write_kubeconfig(root / "kubelet.kubeconfig", f"https://{ip}:{APISERVER_PORT}",
                                          pki.ca_crt, pki.token(f"system:node:{name}"), f"system:node:{name}")
    KUBELET_ROOT.mkdir(parents=True, exist_ok=True)
    procs.start("kubelet", [
        str(bin_dir / "kubelet"), f"--kubeconfig={kubelet_kubeconfig}", "--container-runtime=docker",
        f"--pod-infra-container-image={PAUSE_IMAGE}", "--fail-swap-on=false", "--cgroup-driver=cgroupfs",
        "--cgroups-per-qos=false", "--enforce-node-allocatable=", f"--node-ip={ip}",
        f"--hostname-override={name}", "--eviction-hard=", "--image-gc-high-threshold=100",
        "--image-gc-low-threshold=99", f"--root-dir={KUBELET_ROOT}", "--oom-score-adj=0",
        f"--max-pods={os.environ.get('KUBETUNE_MAX_PODS', '110')}", "--serialize-image-pulls=false",
        "--cluster-domain=cluster.local", "--resolv-conf=/etc/resolv.conf",
    ])
    admin = root / "admin.kubeconfig"
    procs.start("kube-proxy", [
        str(bin_dir / "kube-proxy"), f"--kubeconfig={admin}", "--proxy-mode=iptables",
        f"--hostname-override={name}", "--conntrack-max-per-core=0", "--oom-score-adj=0",
    ])


def ensure_pause_image(bin_dir: Path) -> None:
    if run(["docker", "image", "inspect", PAUSE_IMAGE], check=False).returncode == 0:
        return
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(bin_dir / "pause", arcname="pause")
    proc = subprocess.run(["docker", "import", "--change", 'ENTRYPOINT ["/pause"]', "-", PAUSE_IMAGE],
                          input=buf.getvalue(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise HarnessError(f"docker import of the pause image failed: {proc.stdout.decode()[-800:]}")


# ------------------------------------------------------------------------------------------ up / down
def _up_kubeconfig(path: str) -> ClusterInfo:
    kubeconfig = Path(path)
    wait_for(lambda: _api_ready(kubeconfig), 30, f"the cluster in KUBECONFIG={path} to answer /readyz")
    nodes = run(["kubectl", "--kubeconfig", path, "get", "nodes", "-o", "name"], check=False).stdout.split()
    docker_ok = shutil.which("docker") is not None and run(["docker", "info"], check=False).returncode == 0
    reason = "" if nodes and docker_ok else (
        "the cluster in KUBECONFIG has no nodes" if not nodes else
        "no local Docker engine to build test images with (needed for e2e on an external cluster)")
    info = ClusterInfo(kind="kubeconfig", kubeconfig=path, host_ip=host_ip(), can_run_pods=not reason,
                       reason_no_pods=reason)
    info.save()
    return info


def _up_kubebuilder(assets: str) -> ClusterInfo:
    assets_dir = Path(assets)
    for name in ("etcd", "kube-apiserver"):
        if not (assets_dir / name).exists():
            raise HarnessError(f"KUBEBUILDER_ASSETS={assets} has no {name}")
    root = state_dir()
    ip = host_ip()
    started = time.monotonic()
    kubeconfig = start_control_plane(assets_dir, str(assets_dir / "etcd"), root, ip)
    info = ClusterInfo(kind="kubebuilder", kubeconfig=str(kubeconfig), host_ip=ip, can_run_pods=False,
                       reason_no_pods="KUBEBUILDER_ASSETS gives a control plane only (no kubelet): e2e needs pods")
    info.timings.start_s = time.monotonic() - started
    info.save()
    return info


def _up_harness() -> ClusterInfo:
    if not is_root():
        raise HarnessError("the one-machine cluster needs root (dockerd, kubelet, iptables); run as root or "
                           "point KUBECONFIG at an existing cluster")
    ensure_packages()
    root = state_dir()
    ensure_free_space(root, MIN_STATE_FREE_GB, "the cluster's state (etcd, logs, keys)")
    ensure_free_space(DOCKER_ROOT, MIN_DOCKER_FREE_GB, "Docker (pods, containers)")
    bin_dir, build_s = ensure_binaries(state_dir())
    ip = host_ip()
    info = ClusterInfo(kind="harness", kubeconfig=str(root / "admin.kubeconfig"), host_ip=ip, can_run_pods=True)
    info.timings.build_s = build_s
    started = time.monotonic()
    start_dockerd()
    ensure_pause_image(bin_dir)
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    kubeconfig = start_control_plane(bin_dir, etcd, root, ip)
    start_controllers(bin_dir, root, kubeconfig)
    start_node(bin_dir, root, ip)
    info.timings.start_s = time.monotonic() - started
    _start_checked_node(kubeconfig)
    info.timings.node_ready_s = time.monotonic() - started
    _wait_default_service_account(kubeconfig)
    from .images import ensure_base_image

    images_started = time.monotonic()
    ensure_base_image()
    info.timings.images_s = time.monotonic() - images_started
    info.save()
    return info


def _start_checked_node(kubeconfig: Path) -> None:
    name = node_name()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for component in ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler"):
            if not procs.is_running(component):
                raise _fail_with_log(component, "keep running")
        if _node_ready(kubeconfig, name):
            return
        time.sleep(1)
    raise _fail_with_log("kubelet", "make the node Ready within 120s")


def _wait_default_service_account(kubeconfig: Path) -> None:
    wait_for(lambda: run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "serviceaccount", "default",
                          "-n", "default"], check=False).returncode == 0, 60,
             "the default ServiceAccount (kube-controller-manager)",
             on_timeout=lambda: tail(procs.log_file("kube-controller-manager")))


def up() -> ClusterInfo:
    """Start (or adopt) the cluster; idempotent and safe to call from many processes at once."""
    with procs.machine_lock():
        own = str(state_dir() / "admin.kubeconfig")
        if (os.environ.get("KUBECONFIG") and os.environ["KUBECONFIG"] != own
                and not os.environ.get("KUBETUNE_IGNORE_KUBECONFIG")):
            return _up_kubeconfig(os.environ["KUBECONFIG"])
        if os.environ.get("KUBEBUILDER_ASSETS"):
            return _up_kubebuilder(os.environ["KUBEBUILDER_ASSETS"])
        existing = ClusterInfo.load()
        if existing and existing.kind == "harness" and all(procs.is_running(c) for c in COMPONENTS[1:]):
            kubeconfig = Path(existing.kubeconfig)
            if _api_ready(kubeconfig) and _node_ready(kubeconfig, node_name()):
                return existing  # already up: keep the timings of the `up` that started it
        return _up_harness()


def _pod_containers() -> list[str]:
    out = run(["docker", "ps", "-aq", "--filter", "name=k8s_"], check=False, timeout=30)
    return out.stdout.split() if out.returncode == 0 else []


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [m for m in mounts if m == str(root) or m.startswith(str(root) + "/")]
    for mount in sorted(inside, key=len, reverse=True):
        run(["umount", "-l", mount], check=False)


def _cleanup_kube_proxy_rules() -> None:
    bin_dir = cached_binaries()
    if bin_dir:
        run([str(bin_dir / "kube-proxy"), "--cleanup"], check=False, timeout=60)


def down() -> None:
    """Stop everything this state dir's `up` started; safe after a crash and when nothing runs. Shared
    machine state (pod containers, kubelet mounts, kube-proxy rules, docker's netns) is cleaned only when
    this state dir's kubelet, kube-proxy or dockerd ran."""
    with procs.machine_lock():
        from .prometheus import stop_prometheus
        from .s3 import stop_s3

        stop_prometheus()
        stop_s3()
        had_node = any(procs.pid_file(c).exists() for c in ("kubelet", "kube-proxy"))
        for component in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
            procs.stop(component)
        if had_node and procs.is_running("dockerd"):
            containers = _pod_containers()
            if containers:
                run(["docker", "rm", "-f", "-v", *containers], check=False, timeout=120)
        if had_node:
            _unmount_under(KUBELET_ROOT)
        procs.stop("kube-apiserver")
        procs.stop("etcd")
        own_dockerd = procs.is_running("dockerd")
        procs.stop("dockerd", timeout=30)
        if own_dockerd:
            _unmount_under(Path("/run/docker/netns"))
        if had_node:
            _cleanup_kube_proxy_rules()
        shutil.rmtree(state_dir() / "etcd", ignore_errors=True)
        (state_dir() / "cluster.json").unlink(missing_ok=True)


def status() -> dict[str, object]:
    info = ClusterInfo.load()
    return {
        "kubernetes": K8S_VERSION,
        "cluster": asdict(info) if info else None,
        "processes": {name: procs.pid_of(name) for name in (*COMPONENTS, "s3", "prometheus")},
    }
