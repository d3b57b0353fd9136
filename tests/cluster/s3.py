"""A real S3 HTTP server for tests: moto's server mode, bound to 0.0.0.0 so pods reach it on the host IP.

(No MinIO server binary exists in any registry this machine reaches; production uses MinIO. Tests go
through the same client code as production.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from . import procs
from .paths import state_dir
from .system import HarnessError, host_ip, wait_for

S3_PORT = int(os.environ.get("KUBETUNE_S3_PORT", "19000"))
ACCESS_KEY = "kubetune-test-access"
SECRET_KEY = "kubetune-test-secret-d0n0tl3ak"


@dataclass(frozen=True)
class S3Server:
    host_endpoint: str  # for the test process: http://127.0.0.1:PORT
    pod_endpoint: str  # for pods: http://<host IP>:PORT
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _moto_argv(port: int) -> list[str]:
    server = shutil.which("moto_server", path=str(sys.executable.rsplit("/", 1)[0]))
    if server:
        return [server, "-H", "0.0.0.0", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(port)]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _answers(port: int) -> bool:
    """Any S3 answer counts: an unauthenticated bucket listing is refused quickly with an S3 error document.
    (moto's /moto-api/data.json dumps every object, is slow and fails on leftovers of deleted buckets.)"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as err:
        return err.code < 500


def ensure_s3(port: int = S3_PORT) -> S3Server:
    with procs.machine_lock("s3"):  # pytest workers and parallel runs share one server
        if not procs.is_running("s3"):
            if _port_open(port):
                raise HarnessError(f"port {port} is taken by another program; set KUBETUNE_S3_PORT")
            procs.start("s3", _moto_argv(port))
        wait_for(lambda: _answers(port), 30, "the S3 server (moto) to answer",
                 on_timeout=lambda: procs.log_file("s3").read_text()[-1500:])
        server = S3Server(host_endpoint=f"http://127.0.0.1:{port}", pod_endpoint=f"http://{host_ip()}:{port}",
                          access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        (state_dir() / "s3.json").write_text(server.to_json())
        return server


def stop_s3() -> None:
    procs.stop("s3")
