"""The artifact's manifest: written by the trainer, verified by the trainer's tests, the SDK's download and
``kubetune artifact verify``.

``manifest.json`` lists every other file of the artifact with its sha256 and size::

    {"format": "kubetune-artifact/v1", "files": {"clip-text/model.safetensors": {"sha256": "…", "size": 123}, …}}

The run's status records the sha256 of ``manifest.json`` itself, which so pins every file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune.api.errors import ArtifactCorrupt, ArtifactMissing, ConfigInvalid, StorageUnavailable

from .store import ObjectNotFound, Store, StoreError, StoreUnavailable

FORMAT = "kubetune-artifact/v1"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_matches(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the size and sha256 its manifest entry lists."""
    return path.stat().st_size == entry.get("size") and sha256_file(path) == entry.get("sha256")


def write_manifest(root: Path) -> tuple[str, int, int]:
    """Write manifest.json for every file under ``root``; returns (sha256 of it, total bytes, file count)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = root / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
    total = sum(f["size"] for f in files.values()) + manifest.stat().st_size
    return sha256_file(manifest), total, len(files) + 1


def listed_files(root: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``{path: {"sha256", "size"}}`` of the artifact at ``root``."""
    return dict(json.loads((root / MANIFEST).read_text()).get("files", {}))


def mismatches(root: Path, listed: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """``(path, missing)`` for each listed file that is missing (True) or whose size or sha256 differs (False),
    in path order."""
    out = []
    for name, entry in sorted(listed.items()):
        path = root / name
        if not path.is_file():
            out.append((name, True))
        elif not file_matches(path, entry):
            out.append((name, False))
    return out


def verify_manifest(root: Path) -> list[str]:
    """Problems found (missing, extra or changed files); empty when the artifact is intact."""
    listed = listed_files(root)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"{name}: not in the manifest" for name in sorted(present - set(listed))]
    problems += [f"{name}: missing" if missing else f"{name}: size or sha256 differs"
                 for name, missing in mismatches(root, listed)]
    return problems


def download_artifact(store: Store, directory: Path, expected_sha256: str | None, uri: str) -> Path:
    """Fetch manifest.json then every file it lists, verifying sha256 and size; atomic into ``directory``.

    ``store`` is rooted at the artifact, ``uri`` names it in errors. Raises :class:`~kubetune.ArtifactMissing`,
    :class:`~kubetune.ArtifactCorrupt`, :class:`~kubetune.StorageUnavailable` or (a non-empty ``directory``
    that holds no earlier download) :class:`~kubetune.ConfigInvalid`.
    """
    directory = directory.expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        if (directory / MANIFEST).is_file():
            shutil.rmtree(directory)  # an earlier download: replace it
        else:
            raise ConfigInvalid(f"{directory} exists and is not empty", "choose an empty or new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-artifact-", dir=directory.parent))
    try:
        try:
            manifest_bytes = store.get_bytes(MANIFEST)
        except ObjectNotFound:
            raise ArtifactMissing(f"{uri}/{MANIFEST} does not exist",
                                  "the artifact is incomplete or was deleted; re-run the fine-tune") from None
        if expected_sha256 and hashlib.sha256(manifest_bytes).hexdigest() != expected_sha256:
            raise ArtifactCorrupt(f"{uri}/{MANIFEST}: sha256 differs from the run's status",
                                  "the artifact was changed after the run; re-run the fine-tune")
        manifest = json.loads(manifest_bytes)
        (staging / MANIFEST).write_bytes(manifest_bytes)
        for rel, entry in sorted(manifest.get("files", {}).items()):
            target = staging / rel
            try:
                store.get_file(rel, target)
            except ObjectNotFound:
                raise ArtifactMissing(f"{uri}/{rel} is listed in the manifest but missing",
                                      "the artifact is incomplete; re-run the fine-tune") from None
            if not file_matches(target, entry):
                raise ArtifactCorrupt(f"{uri}/{rel}: sha256 or size differs from the manifest",
                                      "download again; if it persists the stored artifact is damaged")
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except StoreUnavailable as exc:
        raise StorageUnavailable(f"downloading {uri}: {exc}", "is the S3 endpoint reachable?") from None
    except StoreError as exc:
        raise StorageUnavailable(f"downloading {uri}: {exc}", "check the credentials (AWS_ACCESS_KEY_ID...)") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory
