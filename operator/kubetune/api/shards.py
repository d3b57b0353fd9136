"""The WebDataset shard layout `kubetune data shard` writes and the trainer streams (``data.format: webdataset``).

``<prefix>/shard-000000.tar``, … hold one sample per unique image: ``<key>.jpg`` (or another of
:data:`IMAGE_EXTENSIONS`), ``<key>.txt`` (its first caption, so open_clip_train reads the shards too) and
``<key>.json`` (``{"captions": [...], "rows": [...]}``). Beside them, :data:`SIZES` (open_clip's samples per
shard) and :data:`MANIFEST` (images and pairs per shard), written last: its presence means the set is complete.
"""

from __future__ import annotations

import re

SHARD_NAME = "shard-{:06d}.tar"
SHARD_PATTERN = re.compile(r"shard-\d{6}\.tar")
SIZES = "sizes.json"
MANIFEST = "kubetune-shards.json"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST", "MANIFEST_VERSION", "SHARD_NAME", "SHARD_PATTERN", "SIZES"]
