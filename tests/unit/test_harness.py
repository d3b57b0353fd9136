"""The harness's own building blocks, with real processes, real openssl and a real Prometheus."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest

from tests.cluster import build, cluster, procs
from tests.cluster.pki import ensure_pki
from tests.cluster.prometheus import Prometheus
from tests.cluster.system import HarnessError, ensure_free_space


@pytest.fixture
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.unit
def test_a_daemon_that_dies_is_reported_with_its_log(isolated_state: Path) -> None:
    argv = ["sh", "-c", "echo 'listen tcp :2379: bind: address already in use' >&2; exit 3"]
    with pytest.raises(HarnessError) as err:
        cluster._start_checked("fake-etcd", argv, lambda: False, timeout=10)
    assert "fake-etcd failed to start (exit code 3)" in str(err.value)
    assert "address already in use" in str(err.value)


@pytest.mark.unit
def test_a_daemon_killed_without_a_word_is_reported_with_its_signal(isolated_state: Path) -> None:
    # What a full disk or the OOM killer leaves: a log with nothing after the start line. Meanwhile another
    # thread runs subprocesses, as pytest's other fixtures do: subprocess's clean-up of dropped Popen objects
    # must not reap the daemon before the harness reads how it ended (seen in the full suite).
    stop = threading.Event()

    def neighbour() -> None:
        while not stop.is_set():
            subprocess.run(["true"], check=True)

    thread = threading.Thread(target=neighbour, daemon=True)
    thread.start()
    try:
        with pytest.raises(HarnessError) as err:
            cluster._start_checked("silent", ["sh", "-c", "sleep 0.5; kill -9 $$"], lambda: False, timeout=10)
    finally:
        stop.set()
        thread.join()
    assert "silent failed to start (killed by SIGKILL)" in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(("program", "stat", "cmdline", "expected"), [
    ("/usr/bin/etcd", "7 (etcd) S 1 7", b"/usr/bin/etcd\0--data-dir\0/tmp/x\0", True),
    ("/usr/bin/etcd", "7 (sleep) S 1 7", b"sleep\0300\0", False),  # a recycled pid: a stranger
    ("/usr/bin/etcd", "7 (etcd) Z 1 7", b"", False),  # dead, not yet reaped
    # Just started: the kernel is still setting the new program up and cmdline reads empty (seen in CI: the
    # harness took the etcd, and later the dockerd, it had just started for dead); the command name decides.
    ("/usr/sbin/dockerd", "7 (dockerd) R 1 7", b"", True),
    ("/k8s/kube-controller-manager", "7 (kube-controller) R 1 7", b"", True),  # names are cut at 15 chars
    ("/usr/bin/etcd", "7 (python3) R 1 7", b"", False),
    ("/venv/bin/mlflow", "7 (mlflow) S 1 7", b"/venv/bin/python\0/venv/bin/mlflow\0server\0", True),  # a script
    ("/venv/bin/weed", "7 (weed) S 1 7", b"/venv/bin/weed\0-logtostderr\0server\0", True),
    ("", "7 (anything (odd) name) S 1 7", b"x\0", True),
])
def test_a_daemon_is_recognised_by_its_program(program: str, stat: str, cmdline: bytes, expected: bool) -> None:
    assert procs.runs_program(program, stat, cmdline) is expected


@pytest.mark.unit
def test_too_little_disk_space_is_a_clear_error(tmp_path: Path) -> None:
    ensure_free_space(tmp_path / "not" / "yet" / "made", 0.001, "a test")  # walks up to an existing parent
    with pytest.raises(HarnessError, match=r"GB free on the filesystem of .*; etcd needs at least 100000 GB"):
        ensure_free_space(tmp_path, 100_000, "etcd")


def _live_members(group: int) -> list[str]:
    """Processes of a process group, zombies excluded (this test process is the parent of the leader)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(group)], text=True, stdout=subprocess.PIPE).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z")]


@pytest.mark.unit
def test_start_is_idempotent_and_stop_kills_the_process_group(isolated_state: Path) -> None:
    pid = procs.start("sleeper", ["sh", "-c", "sleep 300 & sleep 300"])
    assert procs.start("sleeper", ["sh", "-c", "exit 1"]) == pid  # already running: not started twice
    assert len(_live_members(pid)) >= 2
    procs.stop("sleeper")
    assert not procs.is_running("sleeper")
    assert _live_members(pid) == []
    procs.stop("sleeper")  # stopping what is not running is fine


@pytest.mark.unit
def test_build_key_follows_the_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    for patch in build.PATCH_DIR.glob("*.patch"):
        (patches / patch.name).write_bytes(patch.read_bytes())
    monkeypatch.setattr(build, "PATCH_DIR", patches)
    original = build.build_key()
    assert build.build_key() == original
    (patches / "0002-extra.patch").write_text("--- a/x\n+++ b/x\n")
    assert build.build_key() != original


@pytest.mark.unit
def test_the_oom_patch_applies_to_the_cached_source_tree() -> None:
    """The documented kubelet patch still applies to Debian's source (checked against the real tarball)."""
    tarball = build.cache_dir() / "src" / build.DEBIAN_ORIG_TARBALL
    if not tarball.exists():
        pytest.skip(f"the Kubernetes source tarball is not cached yet ({tarball}); `python -m tests.cluster build`")
    import tarfile

    wanted = ("pkg/kubelet/dockershim/docker_sandbox.go", "pkg/kubelet/qos/policy.go")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] in wanted]
        assert len(members) == 2
        tree = Path(build.cache_dir()) / "patch-check"
        tar.extractall(tree, members=members, filter="tar")
    (source,) = list(tree.iterdir())
    out = subprocess.run(["patch", "-p1", "--dry-run", "-i",
                          str(build.PATCH_DIR / "0001-kubelet-oom-score-adj-zero.patch")],
                         cwd=source, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout


@pytest.mark.unit
def test_pki_serving_cert_names_every_address_pods_and_tests_use(tmp_path: Path) -> None:
    pki = ensure_pki(tmp_path / "pki", "10.1.2.3", "node-a")
    text = subprocess.run(["openssl", "x509", "-in", str(pki.serving_crt), "-noout", "-text"], text=True,
                          stdout=subprocess.PIPE, check=True).stdout
    for name in ("IP Address:10.1.2.3", "IP Address:127.0.0.1", "IP Address:10.96.0.1",
                 "DNS:kubernetes.default.svc"):
        assert name in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_crt), str(pki.serving_crt)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert verify.returncode == 0, verify.stdout
    assert pki.token("system:node:node-a") != pki.token("admin")
    assert ensure_pki(tmp_path / "pki", "10.1.2.3", "node-a").token("admin") == pki.token("admin")  # reused


class _Exposition(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# TYPE harness_probe gauge\nharness_probe{kind=\"test\"} 42\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.integration
def test_prometheus_scrapes_a_target_the_test_registers(prometheus: Prometheus) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = prometheus.add_target("harness-probe", f"127.0.0.1:{server.server_address[1]}")
    try:
        result = prometheus.wait_for_series('harness_probe{job="harness-probe"}', timeout=60)
        assert result and float(result[0]["value"][1]) == 42
        with pytest.raises(HarnessError, match="parse error"):
            prometheus.query("sum(harness_probe")
    finally:
        target.unlink()
        server.shutdown()


@pytest.mark.unit
def test_a_pid_file_left_by_a_killed_session_never_adopts_another_program(isolated_state: Path) -> None:
    import os

    procs.pid_file("etcd").parent.mkdir(parents=True, exist_ok=True)
    procs.pid_file("etcd").write_text(f"{os.getpid()} /usr/bin/etcd")  # this pid is pytest, not etcd
    assert procs.pid_of("etcd") is None
    pid = procs.start("etcd", ["sleep", "60"])  # so `up` starts a real one instead of trusting the file
    assert procs.pid_of("etcd") == pid
    procs.stop("etcd")


@pytest.mark.unit
def test_a_script_daemon_is_recognised_and_stopped(isolated_state: Path, tmp_path: Path) -> None:
    """Scripts run as `<interpreter> <script>` (Python console scripts do): still ours, so `down` stops them."""
    script = tmp_path / "fake-server"
    script.write_text("#!/bin/sh\nsleep 300\n")
    script.chmod(0o755)
    pid = procs.start("fake-server", [str(script)])
    assert procs.pid_of("fake-server") == pid
    procs.stop("fake-server")
    assert _live_members(pid) == []


@pytest.mark.unit
def test_the_s3_server_starts_once_refuses_a_wrong_secret_and_down_drops_it(isolated_state: Path) -> None:
    import io
    import time

    from minio import Minio
    from minio.error import S3Error

    from tests.cluster import s3

    port = s3._free_ports(1)[0]
    procs.start("s3", ["sleep", "300"])  # the S3 server of an older checkout: replaced, not adopted
    started = time.monotonic()
    server = s3.ensure_s3(port)
    start_seconds = time.monotonic() - started
    pid = procs.pid_of("s3")
    try:
        assert s3.ensure_s3(port) == server and procs.pid_of("s3") == pid  # a second `up` finds it running
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "weed"
        client = Minio(server.host_endpoint.removeprefix("http://"), access_key=server.access_key,
                       secret_key=server.secret_key, secure=False, region=server.region)
        client.make_bucket("kt-harness")
        client.put_object("kt-harness", "a/b.json", io.BytesIO(b"{}"), 2)
        # every bucket's data in one collection: deleting a bucket never strands its objects' chunks
        volumes = {path.name.rsplit("_", 1)[0] for path in (isolated_state / "s3" / "data").glob("*.dat")}
        assert "kubetune-tests" in volumes and "kt-harness" not in volumes, volumes
        wrong = Minio(server.host_endpoint.removeprefix("http://"), access_key=server.access_key,
                      secret_key="not-the-secret", secure=False, region=server.region)
        with pytest.raises(S3Error) as refused:
            list(wrong.list_objects("kt-harness"))
        assert refused.value.code == "SignatureDoesNotMatch"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert s3._socket_files(argv)  # its Unix sockets in /tmp, removed by `down`
    finally:
        s3.stop_s3()
    assert procs.pid_of("s3") is None and not (isolated_state / "s3" / "data").exists()
    assert s3._socket_files(argv) == []
    print(f"\nSeaweedFS answered signed requests {start_seconds:.1f}s after start")


@pytest.mark.unit
@pytest.mark.parametrize("kind", [None, "kubeconfig", "kubebuilder"])
def test_restart_apiserver_refuses_a_cluster_the_harness_did_not_start(isolated_state: Path, kind: str | None) -> None:
    if kind:
        cluster.ClusterInfo(kind=kind, kubeconfig=str(isolated_state / "kc"), host_ip="127.0.0.1",
                            can_run_pods=False).save()
    with pytest.raises(HarnessError, match="only on the harness's own cluster"):
        cluster.restart_apiserver(0.0)


@pytest.mark.unit
def test_restart_apiserver_leaves_an_api_server_it_did_not_start_alone(isolated_state: Path) -> None:
    cluster.ClusterInfo(kind="harness", kubeconfig=str(isolated_state / "kc"), host_ip="127.0.0.1",
                        can_run_pods=True).save()
    pid = procs.start("kube-apiserver", ["sleep", "300"])  # not the harness's command line
    try:
        with pytest.raises(HarnessError):
            cluster.restart_apiserver(0.0)
        assert procs.pid_of("kube-apiserver") == pid
    finally:
        procs.stop("kube-apiserver")
