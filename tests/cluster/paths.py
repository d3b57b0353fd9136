"""Where the harness keeps its cache (survives runs) and its state (one running cluster per machine)."""

from __future__ import annotations

import os
from pathlib import Path

K8S_VERSION = "v1.20.2"
DEBIAN_SOURCE_PACKAGE = "kubernetes"
DEBIAN_ORIG_TARBALL = "kubernetes_1.20.5+really1.20.2.orig.tar.gz"
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")

DOCKER_ROOT = Path("/var/lib/docker")  # Debian docker.io's data root: images, containers, their logs
PATCH_DIR = Path(__file__).resolve().parent / "patches"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """User cache (XDG): built binaries, downloaded sources, Go build cache, base image tarballs."""
    base = os.environ.get("KUBETUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kubetune"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """The running cluster's keys, tokens, logs, pid files and data. One per machine, shared by workers."""
    path = Path(os.environ.get("KUBETUNE_STATE_DIR", "/tmp/kubetune-cluster"))
    path.mkdir(parents=True, exist_ok=True)
    return path
