"""Images without a registry: a Debian base image made with debootstrap, and project images built on it.

Builds that download (pip) get two things from the harness through a loopback HTTP server, used with
``--network host``: ``PIP_FIND_LINKS`` (a cached wheelhouse, so nothing is fetched twice) and
``CA_BUNDLE_URL`` (the system CA bundle, for TLS-intercepting proxies such as this machine's egress and
corporate ones). A Dockerfile that downloads fetches the bundle in the same RUN step that uses it, so no
layer keeps it. Users behind a proxy pass the same build args.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

from .paths import DOCKER_ROOT, REPO_ROOT, cache_dir
from .system import HarnessError, ensure_free_space, ensure_packages, run

BASE_IMAGE = "kubetune/debian-python:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
SYSTEM_CA_BUNDLE = Path(os.environ.get("KUBETUNE_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def _debian_mirror() -> str:
    from .system import _debian_mirror

    return _debian_mirror()


def ensure_base_image(tag: str = BASE_IMAGE) -> str:
    """Debian bookworm minbase + python3 (3.11, matching the cp311 wheels on these machines)."""
    if image_exists(tag):
        return tag
    tarball = cache_dir() / "images" / "debian-python-bookworm.tar"
    if not tarball.exists():
        ensure_packages(("debootstrap",))
        rootfs = cache_dir() / "images" / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        out = run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
                   str(rootfs), _debian_mirror()], check=False, timeout=1200)
        if out.returncode != 0:
            raise HarnessError(f"debootstrap failed:\n{out.stdout[-2000:]}")
        partial_tar = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "-cf", str(partial_tar), "."])
        partial_tar.rename(tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    with tarball.open("rb") as fh:
        proc = subprocess.run(["docker", "import", "--change", 'CMD ["python3"]', "-", tag], stdin=fh,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise HarnessError(f"docker import of the base image failed: {proc.stdout.decode()[-800:]}")
    return tag


def wheelhouse(requirements: Sequence[str]) -> Path:
    """A cached directory of wheels for `requirements` (pip download, keyed by the requirement list)."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    target = cache_dir() / "wheelhouse" / key
    done = target / ".complete"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    # Same interpreter version as the base image (CPython 3.11 on x86_64): a plain download picks the right
    # wheels (explicit --platform lists miss tags such as manylinux_2_27 that torch's CUDA wheels use).
    if sys.version_info[:2] != (3, 11):
        raise HarnessError("the image wheelhouse is downloaded for the base image's CPython 3.11: run the harness "
                           f"with a Python 3.11 interpreter (this is {sys.version.split()[0]})")
    out = run([sys.executable, "-m", "pip", "download", "--dest", str(target), *requirements], check=False,
              timeout=1800)
    if out.returncode != 0:
        raise HarnessError(f"pip download for the image wheelhouse failed:\n{out.stdout[-3000:]}")
    done.write_text("\n".join(requirements))
    return target


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_build_files(wheels: Path | None) -> Iterator[str]:
    """Serve /wheels/ and /ca-bundle.crt on 127.0.0.1 for the duration of a build; yields the base URL."""
    root = cache_dir() / "build-serve" / f"{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if wheels:
        (root / "wheels").symlink_to(wheels)
    if SYSTEM_CA_BUNDLE.exists():
        shutil.copy(SYSTEM_CA_BUNDLE, root / "ca-bundle.crt")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def build_image(tag: str, context: Path, dockerfile: Path | None = None, *,
                build_args: Mapping[str, str] | None = None, wheels_for: Sequence[str] = (),
                labels: Mapping[str, str] | None = None, timeout: float = 1800) -> float:
    """Build `tag` from `context` on the local base image with the classic builder. Returns seconds taken.

    `wheels_for`: pip requirements to pre-download into a cached wheelhouse served as PIP_FIND_LINKS.
    """
    ensure_base_image()
    # A torch image is about 6.5 GB (its CUDA wheels); anything else is well under 1 GB.
    heavy = any(req.split("=")[0].strip().lower() == "torch" for req in wheels_for)
    ensure_free_space(DOCKER_ROOT, 10.0 if heavy else 2.0, f"building {tag}")
    wheels = wheelhouse(list(wheels_for)) if wheels_for else None
    started = time.monotonic()
    with serve_build_files(wheels) as url:
        args = {"BASE_IMAGE": BASE_IMAGE, "CA_BUNDLE_URL": f"{url}/ca-bundle.crt"}
        if wheels:
            args["PIP_FIND_LINKS"] = f"{url}/wheels/"
        args.update(build_args or {})
        cmd = ["docker", "build", "--force-rm", "--network", "host", "-t", tag]
        if dockerfile:
            cmd += ["-f", str(dockerfile)]
        for key, value in args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        for key, value in (labels or {}).items():
            cmd += ["--label", f"{key}={value}"]
        cmd.append(str(context))
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise HarnessError(f"docker build {tag} failed:\n{proc.stdout[-4000:]}")
    return time.monotonic() - started


def extra_requirements(*extras: str) -> list[str]:
    """The project's base dependencies plus those of `extras`, from pyproject.toml (for a wheelhouse)."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return [*requirements, "setuptools>=69", "wheel"]


def source_digest(*paths: str) -> str:
    """sha256 over the files under `paths` (relative to the repo root), caches and bytecode excluded."""
    digest = hashlib.sha256()
    for rel in paths:
        root = REPO_ROOT / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _image_label(tag: str, label: str) -> str | None:
    out = run(["docker", "image", "inspect", "--format", f'{{{{ index .Config.Labels "{label}" }}}}', tag],
              check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_project_image(tag: str, dockerfile: str, sources: Sequence[str], extras: Sequence[str],
                         build_args: Mapping[str, str] | None = None) -> str:
    """Build a project image from the repo root unless an image with the same source digest exists.

    The digest covers `sources` (paths in the repo), pyproject.toml and the Dockerfile, and is stored as the
    image label ``io.kubetune.source-digest``: a changed trainer or operator rebuilds, an unchanged one does not.
    """
    digest = source_digest(dockerfile, "pyproject.toml", *sources)
    if _image_label(tag, "io.kubetune.source-digest") == digest:
        return tag
    previous = _image_id(tag)
    build_image(tag, REPO_ROOT, REPO_ROOT / dockerfile, wheels_for=extra_requirements(*extras),
                build_args=build_args, labels={"io.kubetune.source-digest": digest})
    if previous and previous != _image_id(tag):
        # The replaced build is now untagged: remove it (a trainer image is 6 GB; rebuilds filled the disk).
        run(["docker", "image", "rm", previous], check=False)
    return tag


def _image_id(tag: str) -> str | None:
    out = run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], check=False)
    return out.stdout.strip() if out.returncode == 0 else None
