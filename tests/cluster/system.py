"""Operating-system prerequisites: Debian packages, deb-src sources, and small process helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Everything the harness needs from Debian. `iptables`/`conntrack` serve kube-proxy, `debootstrap` the base
# image, `golang-go` + build-essential the Kubernetes build, `golang-github-modern-go-reflect2-dev` the
# reflect2 fix (see build.py), `prometheus` the metrics tests.
DEBIAN_PACKAGES = (
    "golang-go",
    "golang-github-modern-go-reflect2-dev",
    "build-essential",
    "rsync",
    "jq",
    "etcd-server",
    "docker.io",
    "iptables",
    "conntrack",
    "socat",
    "iproute2",
    "debootstrap",
    "prometheus",
    "openssl",
    "dpkg-dev",
)

DEB_SRC_FILE = Path("/etc/apt/sources.list.d/kubetune-deb-src.sources")


class HarnessError(RuntimeError):
    """A clear, actionable failure of the environment (printed without a traceback by the CLI)."""


def is_root() -> bool:
    return os.geteuid() == 0


def run(cmd: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, env=env, cwd=cwd, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for name in packages:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if "install ok installed" not in out.stdout:
            missing.append(name)
    return missing


def _debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split(":", 1)[1].strip()
    return "http://deb.debian.org/debian"


def ensure_deb_src() -> bool:
    """Add a deb-src entry for bookworm (needed by `apt-get source kubernetes`). Returns True if added."""
    if DEB_SRC_FILE.exists() or any(
        "deb-src" in p.read_text(errors="ignore") for p in Path("/etc/apt/sources.list.d").glob("*.sources")
    ):
        return False
    DEB_SRC_FILE.write_text(
        "# Added by the kubetune test harness: the Kubernetes build needs Debian's source package.\n"
        f"Types: deb-src\nURIs: {_debian_mirror()}\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    return True


def ensure_packages(packages: Sequence[str] = DEBIAN_PACKAGES, log: Path | None = None) -> None:
    if packages is DEBIAN_PACKAGES and not shutil.which("kubectl"):
        # Debian's kubectl is built from the same 1.20.2 source as the harness's cluster.
        packages = (*packages, "kubernetes-client")
    added_src = ensure_deb_src() if is_root() else False
    missing = missing_packages(packages)
    if not missing and not added_src:
        return
    if not is_root():
        raise HarnessError(f"missing Debian packages {missing}; run as root or install them: "
                           f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = run(["apt-get", "update", "-q"], check=False, env=env)
    if update.returncode != 0:
        raise HarnessError(f"apt-get update failed:\n{update.stdout[-2000:]}")
    if missing:
        out = run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=False, env=env)
        if log:
            log.write_text(out.stdout)
        if out.returncode != 0:
            raise HarnessError(f"apt-get install {' '.join(missing)} failed:\n{out.stdout[-3000:]}")


def which_or_fail(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise HarnessError(f"{binary} not found: {hint}")
    return path


def host_ip() -> str:
    """The machine's first IP: pods reach host services (S3, apiserver) through it; there is no cluster DNS."""
    override = os.environ.get("KUBETUNE_HOST_IP")
    if override:
        return override
    out = run(["hostname", "-I"], check=False).stdout.split()
    ips = [ip for ip in out if ":" not in ip and not ip.startswith("172.17.")]
    if not ips:
        raise HarnessError("could not find the host IP (hostname -I printed nothing usable)")
    return ips[0]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, *, interval: float = 0.5,
             on_timeout: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # a not-yet-started server refuses connections; keep polling
            pass
        time.sleep(interval)
    detail = on_timeout() if on_timeout else ""
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}{': ' + detail if detail else ''}")


def free_gb(path: Path) -> float:
    """Free space, in GB, of the filesystem holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def ensure_free_space(path: Path, need_gb: float, what: str) -> None:
    """Fail with a clear message before a full disk makes a daemon die silently (a process that cannot write
    its log cannot say why it stopped)."""
    free = free_gb(path)
    if free < need_gb:
        raise HarnessError(f"only {free:.1f} GB free on the filesystem of {path}; {what} needs at least "
                           f"{need_gb:.0f} GB. Free some space (e.g. `docker image prune -a`, "
                           f"`python -m tests.cluster down`) and retry")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
