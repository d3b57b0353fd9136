"""Stage pretrained weights into a model mirror, for clusters that cannot reach the Hugging Face hub.

    kubetune models stage ViT-B-32::laion2b_s34b_b79k s3://models/mirror          # downloads on this machine
    kubetune models stage kt-tiny::v1 s3://models/mirror --from ./weights.safetensors

An entry ``<mirror>/<NAME>/<TAG>/`` holds the weights file and a ``manifest.json`` listing its sha256 and size
(:mod:`kubetune.storage.artifact`'s format, so the trainer checks it with the same code as an artifact). The
manifest is uploaded last: an entry is complete once it exists. Trainers read the mirror named by the Helm value
``runDefaults.models.mirror`` (``KUBETUNE_MODEL_MIRROR``) before the hub (:mod:`kubetune_trainer.model`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from kubetune.api.errors import ConfigInvalid, MissingExtra, StorageUnavailable
from kubetune.api.models import WEIGHT_SUFFIXES, mirror_key, parse_ref
from kubetune.api.trainer_env import MODEL_MIRROR_PATTERN
from kubetune.storage import MANIFEST, Store, StoreError, StoreUnavailable, listed_files, s3_store, write_manifest


def stage_model(ref: str, dest: str, source: str | os.PathLike[str] | None = None, store: Store | None = None,
                *, endpoint: str | None = None) -> dict[str, Any]:
    """Copy the weights of ``ref`` (``NAME::TAG``) into the model mirror ``dest`` (``s3://bucket/prefix``), at
    ``<dest>/<NAME>/<TAG>/<file>`` with a sha256 manifest; staging a tag again replaces its entry.

    ``source``: a local weights file (.safetensors, .pt, .pth, .bin, .ckpt) for any NAME::TAG, e.g. a tag of your
    own; None downloads an open_clip tag from the hub on this machine (needs the ``trainer`` extra and internet).
    ``store``: the mirror's root as a :class:`~kubetune.storage.Store`, instead of ``dest`` opened on
    ``endpoint`` (else ``$KUBETUNE_S3_ENDPOINT``, ``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``) with the
    credentials of ``$AWS_ACCESS_KEY_ID`` / ``$AWS_SECRET_ACCESS_KEY``.

    Returns ``{"ref", "name", "pretrained", "uri" (the entry), "file", "sha256", "size", "source"}``. Raises
    :class:`~kubetune.ConfigInvalid` (a bad ref, destination or file), :class:`~kubetune.MissingExtra` (no
    open_clip for a hub download) or :class:`~kubetune.StorageUnavailable` (S3 or the hub unreachable or
    refusing).
    """
    try:
        name, tag = parse_ref(ref)
    except ValueError as exc:
        raise ConfigInvalid(str(exc), "name a model and one of its tags: `kubetune models --all` lists them") from None
    key = mirror_key(name, tag)
    assert key is not None  # parse_ref accepts only names that are keys
    if store is None:
        store = _open(dest, endpoint)
    path = _local_file(Path(source).expanduser(), ref) if source is not None else _from_hub(name, tag, ref)
    entry = store.child(key)
    uri = entry.uri()
    try:
        store.check()
        with tempfile.TemporaryDirectory(prefix=".kubetune-stage-") as tmp:
            root = Path(tmp)
            (root / path.name).symlink_to(path.resolve())  # the manifest hashes it in place: no copy of GBs
            write_manifest(root)
            listed = listed_files(root)[path.name]
            # the old manifest first: from here until the new one is up, the entry reads as absent, never as the
            # new file with the old checksum
            for stale in sorted(entry.list(), key=lambda k: k != MANIFEST):
                entry.delete(stale)
            entry.put_file(path.name, path)
            entry.put_file(MANIFEST, root / MANIFEST)
    except StoreUnavailable as exc:
        raise StorageUnavailable(f"staging {ref} into {uri}: {exc}", "is the S3 endpoint reachable?") from None
    except StoreError as exc:
        raise StorageUnavailable(f"staging {ref} into {uri}: {exc}",
                                 "check the bucket and the credentials (AWS_ACCESS_KEY_ID...)") from None
    return {"ref": f"{name}::{tag}", "name": name, "pretrained": tag, "uri": uri, "file": f"{uri}/{path.name}",
            "sha256": listed["sha256"], "size": listed["size"], "source": str(source) if source else "hub"}


def _open(dest: str, endpoint: str | None) -> Store:
    if not re.match(MODEL_MIRROR_PATTERN, dest):
        raise ConfigInvalid(f"{dest!r} is not a model mirror", "name one as s3://bucket/prefix")
    endpoint = endpoint or os.environ.get("KUBETUNE_S3_ENDPOINT") or os.environ.get(
        "AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        raise ConfigInvalid("no S3 endpoint known on this machine", "set KUBETUNE_S3_ENDPOINT (or AWS_ENDPOINT_URL)")
    try:
        return s3_store(endpoint, dest)
    except ValueError as exc:
        raise ConfigInvalid(str(exc), "set KUBETUNE_S3_ENDPOINT to http(s)://host[:port]") from None


def _local_file(path: Path, ref: str) -> Path:
    if not path.is_file():
        raise ConfigInvalid(f"{path}: no such weights file", f"pass the file {ref}'s weights are in")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigInvalid(f"{path}: not a weights file", f"the trainer loads {', '.join(WEIGHT_SUFFIXES)}")
    return path


def _from_hub(name: str, tag: str, ref: str) -> Path:
    """The tag's file, downloaded by open_clip into this machine's Hugging Face cache."""
    try:
        import open_clip
    except ImportError:
        raise MissingExtra("downloading weights from the hub", "trainer", "open_clip") from None
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigInvalid(f"open_clip has no tag {tag!r} for {name} (its tags: {known})",
                            "pass the weights file of a tag of your own with --from FILE")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # huggingface_hub's and urllib's errors share no base below Exception
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise StorageUnavailable(f"downloading {ref} from the hub: {detail}",
                                 "run this where the hub is reachable, or pass the file with --from FILE") from None
    return Path(path)


__all__ = ["stage_model"]
