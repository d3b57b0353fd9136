"""The streaming WebDataset train path: shards resolved from a manifest, split over ranks and loader workers,
batches reproducible per (seed, epoch) and exactly resumable, read locally and over HTTP."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune_trainer.data import DataError, Fetcher
from kubetune_trainer.shards import (
    MANIFEST,
    SIZES,
    Shard,
    ShardSet,
    ShardStream,
    StreamLoader,
    agreed_batches,
    assign,
    resolve_shards,
)
from PIL import Image
from torchvision import transforms

pytestmark = pytest.mark.unit

CAPTIONS = 2
# a random crop, so that a batch's tensors show whether each pair's augmentation was seeded the same way
TRANSFORM = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.4, 1.0)), transforms.ToTensor()])


def tokenize(texts: list[str]) -> torch.Tensor:
    """'image 12 caption 1' → [12, 1]: a token row names its pair."""
    return torch.tensor([[int(n) for n in re.findall(r"\d+", t)] for t in texts], dtype=torch.long)


def _jpeg(ordinal: int) -> bytes:
    pixels = np.random.default_rng(ordinal).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, images_per_shard: list[int], captions: int = CAPTIONS, manifest: bool = True,
                 sizes: bool = True, image: dict[int, bytes] | None = None, json_captions: bool = True) -> Path:
    """Shards as `kubetune data shard` writes them; ``image`` replaces some images' bytes (by ordinal); without
    ``json_captions`` as open_clip's own shards are (a .txt caption only)."""
    root.mkdir(parents=True, exist_ok=True)
    ordinal, entries = 0, []
    for s, count in enumerate(images_per_shard):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                key = f"{ordinal:09d}"
                texts = [f"image {ordinal} caption {c}" for c in range(captions)]
                _add(tar, f"{key}.jpg", (image or {}).get(ordinal) or _jpeg(ordinal))
                _add(tar, f"{key}.txt", texts[0].encode())
                if json_captions:
                    _add(tar, f"{key}.json", json.dumps({"captions": texts, "rows": [ordinal]}).encode())
                ordinal += 1
        entries.append({"name": name, "images": count, "pairs": count * captions})
    if sizes:
        (root / SIZES).write_text(json.dumps({e["name"]: e["images"] for e in entries}))
    if manifest:
        (root / MANIFEST).write_text(json.dumps({"version": 1, "shards": entries, "images": ordinal,
                                                 "pairs": ordinal * captions, "source": "test.csv"}))
    return root


def pattern(root: Path | str, n: int) -> str:
    return f"{root}/shard-{{000000..{n - 1:06d}}}.tar"


def stream_for(shards: list[Shard], batches: int, fetcher: Fetcher, batch_size: int = 4, rank: int = 0,
               seed: int = 3, skip_bad_rows: bool = False) -> ShardStream:
    return ShardStream(shards, batch_size, batches, TRANSFORM, tokenize, seed=seed, shuffle_buffer=7,
                       fetcher=fetcher, rank=rank, skip_bad_rows=skip_bad_rows)


def epoch(loader: StreamLoader, number: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.stream.set_epoch(number, start_batch)
    return list(loader)


def pairs_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for _, tokens in batches for a, b in tokens.tolist()]


@pytest.fixture
def fetcher(tmp_path: Path) -> Fetcher:
    return Fetcher(tmp_path / "cache")


def test_one_epoch_over_two_ranks_and_two_workers_trains_every_pair_once(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [6] * 8)
    shard_set = resolve_shards(pattern(root, 8), fetcher)
    ranks = assign(shard_set.shards, world_size=2, num_workers=2)
    batches = agreed_batches(shard_set, 6, world_size=2, num_workers=2)
    assert batches == 8  # 48 pairs per rank, 24 per worker: exactly its 4 batches
    seen = []
    for rank, shards in enumerate(ranks):
        out = epoch(StreamLoader(stream_for(shards, batches, fetcher, batch_size=6, rank=rank), num_workers=2), 0)
        assert len(out) == batches and all(images.shape == (6, 3, 16, 16) for images, _ in out)
        seen += pairs_of(out)
    assert sorted(seen) == [(i, c) for i in range(48) for c in range(CAPTIONS)]


def test_unbalanced_shards_give_every_rank_the_same_number_of_batches(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [12, 3, 3, 2, 1])
    shard_set = resolve_shards(pattern(root, 5), fetcher)
    ranks = assign(shard_set.shards, world_size=2, num_workers=2)
    assert [[s.pairs for s in r] for r in ranks] == [[24, 2], [6, 6, 4]]  # one shard per worker at least
    batches = agreed_batches(shard_set, 4, world_size=2, num_workers=2)
    assert batches == min(26 // 4, 16 // 4) == 4
    for rank, shards in enumerate(ranks):  # rank 0's second worker has 2 pairs for 2 batches: it starts over
        out = epoch(StreamLoader(stream_for(shards, batches, fetcher, rank=rank), num_workers=2), 0)
        assert [tuple(images.shape) for images, _ in out] == [(4, 3, 16, 16)] * batches


def test_an_epoch_is_reproducible_for_a_seed_and_differs_across_epochs(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [5] * 4)
    shards = list(resolve_shards(pattern(root, 4), fetcher).shards)
    first = epoch(StreamLoader(stream_for(shards, 10, fetcher), num_workers=2), 0)
    again = epoch(StreamLoader(stream_for(shards, 10, fetcher), num_workers=2), 0)
    for (images_a, tokens_a), (images_b, tokens_b) in zip(first, again, strict=True):
        assert torch.equal(tokens_a, tokens_b) and torch.equal(images_a, images_b)
    assert sorted(pairs_of(first)) == [(i, c) for i in range(20) for c in range(CAPTIONS)]
    later = epoch(StreamLoader(stream_for(shards, 10, fetcher), num_workers=2), 1)
    assert pairs_of(later) != pairs_of(first) and sorted(pairs_of(later)) == sorted(pairs_of(first))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_yields_exactly_the_rest_of_the_uninterrupted_one(tmp_path: Path, fetcher: Fetcher,
                                                                           workers: int) -> None:
    root = write_shards(tmp_path / "set", [5] * 4)
    shards = list(resolve_shards(pattern(root, 4), fetcher).shards)
    loader = StreamLoader(stream_for(shards, 10, fetcher), num_workers=workers)
    full = epoch(loader, 1)
    # 3 is odd: with two workers the resumed epoch starts on the second worker's slot
    same_workers = epoch(loader, 1, start_batch=3)  # persistent workers see the new start
    restarted = epoch(StreamLoader(stream_for(shards, 10, fetcher), num_workers=workers), 1, start_batch=3)
    for resumed in (same_workers, restarted):
        assert len(resumed) == len(full) - 3
        for (images_a, tokens_a), (images_b, tokens_b) in zip(full[3:], resumed, strict=True):
            assert torch.equal(tokens_a, tokens_b) and torch.equal(images_a, images_b)


def test_a_prefix_and_a_brace_pattern_resolve_the_same_shards(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [4, 4, 3])
    write_shards(root / "older", [2])  # a nested prefix is another set
    by_prefix = resolve_shards(f"{root}/", fetcher)
    assert by_prefix == resolve_shards(pattern(root, 3), fetcher)
    assert by_prefix == ShardSet((Shard(f"{root}/shard-000000.tar", 4, 8), Shard(f"{root}/shard-000001.tar", 4, 8),
                                  Shard(f"{root}/shard-000002.tar", 3, 6)))
    assert (by_prefix.images, by_prefix.pairs) == (11, 22)
    assert resolve_shards(f"{root}/shard-000001.tar", fetcher).shards == by_prefix.shards[1:2]


def test_without_a_manifest_shards_are_refused_with_the_hint(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [2, 2], manifest=False, sizes=False)
    with pytest.raises(DataError, match=r"no kubetune-shards.json or sizes.json next to the shards; "
                                        r"`kubetune data shard` writes them"):
        resolve_shards(pattern(root, 2), fetcher)


def test_a_shard_the_manifest_does_not_list_is_named(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [2, 2])
    with pytest.raises(DataError, match=r"shard-000002.tar: not in .*kubetune-shards.json"):
        resolve_shards(pattern(root, 3), fetcher)


def test_foreign_shards_with_sizes_json_give_one_pair_per_sample_from_txt(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [4, 4], manifest=False, json_captions=False)
    shard_set = resolve_shards(pattern(root, 2), fetcher)
    assert [(s.images, s.pairs) for s in shard_set.shards] == [(4, 4), (4, 4)]
    out = epoch(StreamLoader(stream_for(list(shard_set.shards), 2, fetcher), num_workers=0), 0)
    assert sorted(pairs_of(out)) == [(i, 0) for i in range(8)]


def test_too_few_shards_for_ranks_times_workers_are_refused() -> None:
    shards = [Shard(f"s3://b/shard-{i:06d}.tar", 10, 10) for i in range(3)]
    with pytest.raises(DataError, match=r"3 shards for 2 processes × 2 loader workers: at least 4 are needed.*"
                                        r"kubetune data shard --shard-size"):
        assign(shards, world_size=2, num_workers=2)
    assert [len(r) for r in assign(shards, world_size=3)] == [1, 1, 1]


def test_a_bad_sample_fails_the_epoch_naming_shard_and_sample(tmp_path: Path, fetcher: Fetcher) -> None:
    root = write_shards(tmp_path / "set", [4, 4], image={5: b"not an image"})
    shards = list(resolve_shards(pattern(root, 2), fetcher).shards)
    loader = StreamLoader(stream_for(shards, 4, fetcher), num_workers=1)  # raised in a worker, seen as DataError
    with pytest.raises(DataError, match=r"shard-000001.tar: sample 000000005: unreadable image"):
        epoch(loader, 0)


def test_skip_bad_rows_counts_bad_samples_and_keeps_batches_full(tmp_path: Path, fetcher: Fetcher) -> None:
    truncated = _jpeg(2)[:len(_jpeg(2)) // 2]  # its header reads, so it is only met when a batch decodes it
    root = write_shards(tmp_path / "set", [4, 4], image={2: truncated, 5: b"not an image"})
    shards = list(resolve_shards(pattern(root, 2), fetcher).shards)
    stream = stream_for(shards, 2, fetcher, batch_size=7, skip_bad_rows=True)  # the 14 pairs left: all trained
    loader = StreamLoader(stream, num_workers=0)
    out = epoch(loader, 0)
    assert [tuple(images.shape) for images, _ in out] == [(7, 3, 16, 16)] * 2
    trained = set(pairs_of(out))
    assert not trained & {(2, 0), (2, 1), (5, 0), (5, 1)} and len(trained) == 12  # stand-ins fill the batch
    assert stream.bad_samples == 3  # sample 5 where it was read, each pair of sample 2 where it was decoded
    resumed = epoch(loader, 0, start_batch=1)
    assert torch.equal(resumed[0][0], out[1][0]) and torch.equal(resumed[0][1], out[1][1])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on loopback serving a directory; yields (directory, its URL)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_shards_stream_over_http_through_the_fetcher_cache(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, url = http_root
    write_shards(root, [2, 2, 2, 2])
    fetcher = Fetcher(tmp_path / "cache")
    shard_set = resolve_shards(pattern(url, 4), fetcher)
    assert [s.uri for s in shard_set.shards] == [f"{url}/shard-00000{i}.tar" for i in range(4)]
    batches = agreed_batches(shard_set, 4, world_size=1, num_workers=2)
    out = epoch(StreamLoader(stream_for(list(shard_set.shards), batches, fetcher), num_workers=2), 0)
    assert sorted(pairs_of(out)) == [(i, c) for i in range(8) for c in range(CAPTIONS)]
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 4
