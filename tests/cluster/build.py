"""Build Kubernetes v1.20.2 from Debian's `kubernetes` source package, with two documented fixes, and cache it.

The binaries land in ``<cache>/k8s/<version>-<key>/`` where ``key`` hashes the version, the source tarball
name, the patch files and this recipe's version, so a second run builds nothing and a changed patch
rebuilds. Go's build cache is kept beside it, so a rebuild after a patch change is quick.

The two fixes:
1. ``patches/0001-kubelet-oom-score-adj-zero.patch`` (see its header): no negative OOM scores in a sandbox
   without CAP_SYS_RESOURCE.
2. :func:`replace_reflect2`: Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, which crashes
   under Go >= 1.18 (``fatal error ... runtime.mapiterinit ... reflect2.(*UnsafeMapType).UnsafeIterate``, seen
   as the apiserver dying on the first custom-resource create from kubectl 1.32). Debian's Go is 1.19, so the
   vendored copy is replaced with reflect2 1.0.2 from Debian's ``golang-github-modern-go-reflect2-dev``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from .paths import DEBIAN_ORIG_TARBALL, DEBIAN_SOURCE_PACKAGE, K8S_BINARIES, K8S_VERSION, PATCH_DIR, cache_dir
from .system import HarnessError, ensure_packages, run

RECIPE_VERSION = "1"  # bump when the steps below change in a way that changes the binaries
REFLECT2_SOURCE = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
REFLECT2_VENDOR = Path("vendor/github.com/modern-go/reflect2")
ALL_BINARIES = (*K8S_BINARIES, "pause")


def build_key() -> str:
    digest = hashlib.sha256()
    digest.update(f"{K8S_VERSION}|{DEBIAN_ORIG_TARBALL}|recipe={RECIPE_VERSION}|reflect2=1.0.2".encode())
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        digest.update(patch.name.encode())
        digest.update(patch.read_bytes())
    return digest.hexdigest()[:16]


def binaries_dir() -> Path:
    return cache_dir() / "k8s" / f"{K8S_VERSION}-{build_key()}"


def cached_binaries() -> Path | None:
    out = binaries_dir()
    if all((out / name).is_file() for name in ALL_BINARIES):
        return out
    return None


def fetch_source() -> Path:
    src_dir = cache_dir() / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    tarball = src_dir / DEBIAN_ORIG_TARBALL
    if not tarball.exists():
        out = run(["apt-get", "source", "--download-only", DEBIAN_SOURCE_PACKAGE], cwd=src_dir, check=False)
        if out.returncode != 0 or not tarball.exists():
            raise HarnessError(f"could not download Debian's {DEBIAN_SOURCE_PACKAGE} source package "
                               f"(needs a deb-src entry for bookworm):\n{out.stdout[-2000:]}")
    return tarball


def extract(tarball: Path, into: Path) -> Path:
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="tar")
    (tree,) = [p for p in into.iterdir() if p.is_dir()]
    return tree


def apply_patches(tree: Path) -> None:
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        out = run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=tree, check=False)
        if out.returncode != 0:
            raise HarnessError(f"patch {patch.name} does not apply:\n{out.stdout}")


def replace_reflect2(tree: Path) -> None:
    if not (REFLECT2_SOURCE / "go_above_118.go").exists():
        raise HarnessError(f"reflect2 1.0.2 sources not found at {REFLECT2_SOURCE}: "
                           "apt-get install golang-github-modern-go-reflect2-dev")
    vendored = tree / REFLECT2_VENDOR
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2_SOURCE, vendored, symlinks=False)


def compile_tree(tree: Path, log: Path) -> None:
    gopath = tree / ".go"
    (gopath / "src" / "k8s.io").mkdir(parents=True, exist_ok=True)
    link = gopath / "src" / "k8s.io" / "kubernetes"
    if not link.exists():
        link.symlink_to("../../..")
    # Debian's own way (plain `go build -mod=vendor` fails with "updates to go.mod needed").
    env = dict(os.environ, GOPATH=str(gopath), CGO_ENABLED="0", GOFLAGS="",
               GOCACHE=str(cache_dir() / "go-build"), GO111MODULE="off")
    what = " ".join(f"cmd/{name}" for name in K8S_BINARIES)
    with log.open("w") as fh:
        proc = subprocess.run(["make", f"WHAT={what}"], cwd=link, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise HarnessError(f"Kubernetes build failed (log {log}):\n" + "\n".join(log.read_text().splitlines()[-30:]))
    pause = tree / "build" / "pause" / "linux" / "pause.c"
    out = run(["gcc", "-Os", "-static", f"-DVERSION={K8S_VERSION}", "-o", str(tree / "_output" / "bin" / "pause"),
               str(pause)], check=False)
    if out.returncode != 0:
        raise HarnessError(f"compiling the pause binary failed:\n{out.stdout}")


def ensure_binaries(log_dir: Path | None = None) -> tuple[Path, float]:
    """Return (directory with the binaries, seconds spent building: 0.0 when cached)."""
    cached = cached_binaries()
    if cached:
        return cached, 0.0
    started = time.monotonic()
    ensure_packages()
    tarball = fetch_source()
    work = cache_dir() / "build"
    tree = extract(tarball, work)
    apply_patches(tree)
    replace_reflect2(tree)
    log = (log_dir or cache_dir()) / "k8s-build.log"
    compile_tree(tree, log)
    out = binaries_dir()
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    built = tree / "_output" / "bin"
    for name in ALL_BINARIES:
        shutil.copy2(built / name, staging / name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    shutil.rmtree(work, ignore_errors=True)  # the Go build cache stays; the 1 GB tree does not
    return out, time.monotonic() - started
