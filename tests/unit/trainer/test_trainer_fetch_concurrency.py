"""One download per URI however many threads and processes fetch it at once (the start-up validation threads,
DDP ranks and loader workers share one cache directory), and never a torn or missing file for the losers."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kt_trainer_helpers import HttpFiles
from kubetune.api.spec import DataSpec
from kubetune.storage import RetryPolicy
from kubetune_trainer.cache import shared_dir, write_atomically
from kubetune_trainer.data import Fetcher, FetchUnavailable, load_set
from PIL import Image

pytestmark = pytest.mark.unit

DELAY = 0.05  # per request: wide enough a window that every racing fetcher sees the file missing


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (37 * i % 256, 91 * i % 256, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def server(http_files: HttpFiles) -> HttpFiles:
    """Thirty small JPEGs at ``/img/<i>.jpg``, each GET answered after ``DELAY``."""
    http_files.bodies.update({f"/img/{i}.jpg": _jpeg(i) for i in range(30)})
    http_files.delay = DELAY
    return http_files


def test_threads_fetching_the_same_uris_download_each_once(server: HttpFiles, tmp_path: Path) -> None:
    fetcher = Fetcher(tmp_path / "cache")
    paths = [f"/img/{i}.jpg" for i in range(4)]
    calls = [path for _ in range(10) for path in paths]  # 40 calls, 10 per URI, all in flight together

    def fetch(path: str) -> tuple[str, bytes]:
        return path, fetcher.local_path(server.uri(path)).read_bytes()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(fetch, calls))
    assert all(data == server.bodies[path] for path, data in results)
    assert {path: server.gets[path] for path in paths} == dict.fromkeys(paths, 1)
    assert not list((tmp_path / "cache").glob("*.part"))


def _fetch_in_child(cache: str, uris: list[str], barrier: Any, results: Any) -> None:
    fetcher = Fetcher(Path(cache))
    barrier.wait(timeout=60)
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(fetcher.local_path, uris * 3))
    results.put({uri: hashlib.sha256(path.read_bytes()).hexdigest() for uri, path in zip(uris * 3, paths,
                                                                                          strict=True)})


def _run_in_two_processes(target: Any, *args: Any) -> list[Any]:
    """Run ``target(*args, barrier, results)`` in two spawned processes released together; their results."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        out = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    return out


def test_processes_sharing_a_cache_download_each_uri_once(server: HttpFiles, tmp_path: Path) -> None:
    paths = [f"/img/{i}.jpg" for i in range(6)]
    uris = [server.uri(path) for path in paths]
    first, second = _run_in_two_processes(_fetch_in_child, str(tmp_path / "cache"), uris)
    expected = {server.uri(path): hashlib.sha256(server.bodies[path]).hexdigest() for path in paths}
    assert first == second == expected
    assert {path: server.gets[path] for path in paths} == dict.fromkeys(paths, 1)


def test_load_set_with_shared_images_loads_every_row_and_downloads_each_image_once(
        server: HttpFiles, tmp_path: Path) -> None:
    # image-major rows: the five captions of one image are validated by five threads at the same moment
    lines = [f"caption {i}.{j},img/{i}.jpg" for i in range(30) for j in range(5)]
    server.bodies["/train.csv"] = ("text,image\n" + "\n".join(lines) + "\n").encode()
    uri = server.uri("/train.csv")
    pairs = load_set("train", uri, DataSpec(train=uri, skip_bad_rows=True), Fetcher(tmp_path / "cache"), workers=8)
    assert (len(pairs), pairs.skipped, pairs.skip_reasons) == (150, 0, [])
    images = {path: n for path, n in server.gets.items() if path.startswith("/img/")}
    assert images == {f"/img/{i}.jpg": 1 for i in range(30)}
    assert pairs.pairs[7].image.key == server.uri("/img/1.jpg")
    assert pairs.pairs[5].image is pairs.pairs[7].image  # one reference (and one decoded copy) per image
    assert pairs.pairs[7].image.open().tobytes() == Image.open(io.BytesIO(_jpeg(1))).convert("RGB").tobytes()


def test_a_failed_fetch_leaves_no_file_and_keeps_its_error(server: HttpFiles, tmp_path: Path) -> None:
    fetcher = Fetcher(tmp_path / "cache", retry=RetryPolicy.for_window(0))
    with pytest.raises(FileNotFoundError):
        fetcher.local_path(server.uri("/img/absent.jpg"))
    server.unavailable.add("/img/3.jpg")
    with pytest.raises(FetchUnavailable):
        fetcher.local_path(server.uri("/img/3.jpg"))
    server.unavailable.clear()
    assert fetcher.local_path(server.uri("/img/3.jpg")).read_bytes() == server.bodies["/img/3.jpg"]
    cache = tmp_path / "cache"
    assert [p.suffix for p in cache.iterdir() if not p.name.startswith(".")] == [".jpg"]  # no partial file


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty directory: the rename onto it fails
    with pytest.raises(OSError):
        write_atomically(target, b"data", prefix="taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _fill(calls: Path, into: Path) -> bool:
    """A slow download of a two-file directory; each call leaves a file in ``calls``."""
    os.close(tempfile.mkstemp(dir=calls)[0])
    time.sleep(5 * DELAY)
    (into / "sub").mkdir()
    (into / "manifest.json").write_text("{}")
    (into / "sub" / "weights").write_bytes(b"w" * 1000)
    return True


def _shared_dir_in_child(target: str, calls: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=60)
    got = shared_dir(Path(target), "s3://b/artifact", lambda into: _fill(Path(calls), into))
    assert got is not None
    results.put(sorted(str(p.relative_to(got)) for p in got.rglob("*")))


def test_a_shared_directory_is_filled_once_and_never_emptied_under_a_reader(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    calls.mkdir()

    # two processes (DDP ranks) racing: one fills, the other waits and reuses
    listings = _run_in_two_processes(_shared_dir_in_child, str(tmp_path / "ranks" / "weights"), str(calls))
    assert listings == [["manifest.json", "sub", "sub/weights"]] * 2 and len(list(calls.iterdir())) == 1

    # threads racing over a directory an interrupted download left (no .source marker): replaced, once
    target = tmp_path / "work" / "weights"
    target.mkdir(parents=True)
    (target / "half").write_text("partial")

    def fill(into: Path) -> bool:
        return _fill(calls, into)

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda _: shared_dir(target, "s3://b/artifact", fill), range(6)))
    assert got == [target] * 6 and len(list(calls.iterdir())) == 2
    assert sorted(p.name for p in target.rglob("*")) == ["manifest.json", "sub", "weights"]
    assert (tmp_path / "work" / "weights.source").read_text() == "s3://b/artifact"

    # another source replaces it; an empty source is None and leaves nothing behind
    assert shared_dir(target, "s3://b/other", fill) == target and len(list(calls.iterdir())) == 3
    assert shared_dir(tmp_path / "work" / "empty", "s3://b/none", lambda into: False) is None
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "empty.lock", "weights", "weights.lock", "weights.source"]
