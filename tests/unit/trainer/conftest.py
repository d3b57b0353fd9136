"""Fixtures of the trainer tests (helpers live in kt_trainer_helpers)."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kt_trainer_helpers import HttpFiles


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n=256, eval_n=96, size=32, seed=0)


@pytest.fixture(autouse=True)
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's trainer writes its termination message here, never to the /dev/termination-log of a CI pod
    the tests may run in."""
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _mlflow_server(root: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real MLflow tracking server on loopback (SQLite store, local artifact root) until the block ends; yields
    its URL. It is killed with its worker processes."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
           *args]
    # no background job runner: the tests never submit server-side jobs, and the CPUs are shared
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    with open(root / "server.log", "wb") as server_log:
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n"
                            f"{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its own session: uvicorn and its workers go too
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server that asks for no credentials; yields its URL."""
    with _mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def mlflow_auth_server(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A real MLflow tracking server with MLflow's own basic-auth app (a user store in SQLite, nothing readable
    without credentials); yields its URL and the admin's user name and password."""
    root = tmp_path / "mlflow-auth"
    root.mkdir()
    user, password = "admin", "kt-" + os.urandom(12).hex()
    config = root / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{root / 'users.db'}\nadmin_username = {user}\n"
                      f"admin_password = {password}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    with _mlflow_server(root, "--app-name", "basic-auth", env=env) as url:
        yield url, user, password


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[HttpFiles]:
    """A real HTTP server on loopback over an empty ``tmp_path/served`` root and no bodies."""
    root = tmp_path / "served"
    root.mkdir()
    state = HttpFiles(root)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.gets[self.path] += 1
                seen = state.gets[self.path]
            time.sleep(state.delay)
            body = state.body(self.path)
            if self.path in state.unavailable:
                self.send_error(503)
            elif body is None:
                self.send_error(404)
            elif seen <= state.fail_first:
                self.send_error(503)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Threading(http.server.ThreadingHTTPServer):
        # loader workers, ranks and fetch threads (16 and more) connect at once, and the default listen backlog
        # of 5 would refuse some of them
        request_queue_size = 128

    httpd = Threading(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
