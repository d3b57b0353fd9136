"""Sets read lazily in the loader workers, the LRU disk cache of fetched images, and the streamed WebDataset train
path, end to end on real JPEGs: what is fetched when, which bad row stops a run and when, and what is counted.

A row number is the CSV's line number minus its header line, as the trainer names it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kt_trainer_helpers import HttpFiles, of_type, run_trainer, tiny_spec, write_run
from kubetune.api.events import EXIT_BAD_DATA, Event, parse_line
from kubetune.api.spec import DataSpec
from kubetune_trainer.cache import DiskBudget
from kubetune_trainer.data import Fetcher, ImageRef, load_set
from kubetune_trainer.sampling import epoch_batches
from kubetune_trainer.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw
from PIL import Image

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[3]

CAPTIONS = 5  # per image; rows are image-major, so image i holds rows 5i+1 … 5i+5
SEED = 7  # tiny_spec's training seed: the batch order below is computed from it
BATCH = 32
COMBOS = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]

BLOCK = 4096  # one filesystem block: a file of this size takes exactly its size on disk


# ------------------------------------------------------------------------------------------------ data
def photo(i: int) -> bytes:
    """A 224 px JPEG of ~11–16 KB: a learnable coloured shape under grain, different for every ``i``."""
    colour, shape, background = COMBOS[i % len(COMBOS)]
    pixels = np.asarray(draw(colour, shape, background, 224, random.Random(i)), dtype=np.float32)
    grain = np.random.default_rng(i).normal(0, 14, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def captions(i: int) -> list[str]:
    colour, shape, background = COMBOS[i % len(COMBOS)]
    return [f"a {colour} {shape} on a {background} background", f"{colour} {shape}, {background} background",
            f"a picture of a {colour} {shape}", f"a {background} background with a {colour} {shape}",
            f"the {colour} {shape}"]


def rows_of(image: int) -> list[int]:
    return [CAPTIONS * image + j + 1 for j in range(CAPTIONS)]


def write_set(root: Path, images: int, broken: Sequence[int] = ()) -> Path:
    """``root/train.csv`` (image-major, 5 captions per image) over ``root/img/<i>.jpg``; a ``broken`` image holds
    a JPEG cut after its first 300 bytes, which no decoder reads whole."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "image"])
        for i in range(images):
            data = photo(i)
            (root / "img" / f"{i}.jpg").write_bytes(data[:300] if i in broken else data)
            writer.writerows([text, f"img/{i}.jpg"] for text in captions(i))
    return root / "train.csv"


def order_read(pairs: int, epochs: int, world_size: int = 1, rank: int = 0) -> list[list[list[int]]]:
    """The pair indices each step of each epoch reads on ``rank`` (what the trainer's sampler yields)."""
    return [epoch_batches(pairs, BATCH, SEED, epoch, rank, world_size) for epoch in range(epochs)]


def bad_indices(broken: Sequence[int]) -> set[int]:
    return {row - 1 for image in broken for row in rows_of(image)}


# ------------------------------------------------------------------------------------------------ http
def image_gets(server: HttpFiles) -> dict[str, int]:
    """The GETs of each image path so far."""
    with server.lock:
        return {path: n for path, n in server.gets.items() if path.startswith("/img/")}


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture
def every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """One progress event per step (in this process and in the trainers it starts)."""
    monkeypatch.setenv("KUBETUNE_PROGRESS_SECONDS", "0")


@dataclass
class Run:
    code: int
    events: list[Event]
    log: str  # stdout and stderr
    seconds: float

    def failed(self) -> tuple[Event, str]:
        """The one ``failed`` event and its message."""
        failed = of_type(self.events, "failed")
        assert len(failed) == 1, self.log[-4000:]
        return failed[0], failed[0].message or ""


def run_in_process(root: Path, spec: dict[str, Any]) -> Run:
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code, events, raw = run_trainer(["--config", str(write_run(root / "run.yaml", spec)),
                                     "--output-dir", str(root / "out")])
    return Run(code, events, raw, time.monotonic() - started)


def run_process(root: Path, spec: dict[str, Any], nproc: int = 1, timeout: float = 120) -> Run:
    """The trainer as a pod runs it (loader workers are forked from it; ``nproc`` > 1: torchrun, gloo)."""
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", KUBETUNE_PROGRESS_SECONDS="0",
               KUBETUNE_TERMINATION_LOG=str(root / "termination-log"),
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image"),
                                           env.get("PYTHONPATH", "")]))
    config = write_run(root / "run.yaml", spec)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config),
                           "--output-dir", str(root / "out"), "--nproc", str(nproc)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    events = [e for e in (parse_line(line) for line in proc.stdout.splitlines()) if e is not None]
    return Run(proc.returncode, events, proc.stdout + "\n--- stderr ---\n" + proc.stderr,
               time.monotonic() - started)


def losses(run: Run) -> list[float]:
    return [p.loss for p in of_type(run.events, "progress") if p.loss is not None]


def skipped_rows(event: Event) -> int:
    return int((event.model_extra or {}).get("skipped_rows") or 0)


def started_skipped(run: Run) -> int:
    """Rows skipped before the first step (the started event counts them per set)."""
    return sum(((of_type(run.events, "started")[0].model_extra or {}).get("skipped_rows") or {}).values())


# ------------------------------------------------------------------------------------------------ disk cache
def _files(directory: Path, sizes: dict[str, int], mtimes: dict[str, float]) -> None:
    for name, size in sizes.items():
        (directory / name).write_bytes(b"x" * size)
        os.utime(directory / name, (mtimes[name], mtimes[name]))


def test_a_sweep_deletes_least_recently_used_files_down_to_eighty_percent_sparing_locks_and_partial_files(
        tmp_path: Path) -> None:
    now = time.time()
    names = [f"image-{i}.jpg" for i in range(10)]
    # used in the order 0 … 9, all long before the grace period
    # a block's worth each: the budget counts the blocks a file takes (a 1000-byte file takes 4096)
    _files(tmp_path, dict.fromkeys(names, BLOCK), {n: now - 1000 + i for i, n in enumerate(names)})
    (tmp_path / ".locks").mkdir()
    kept = {".locks/abc.lock": 5000, "fetch.part": 5000, ".hidden": 5000, "shards.lock": 5000,
            "shards.source": 5000}
    for name, size in kept.items():
        (tmp_path / name).write_bytes(b"y" * size)
        os.utime(tmp_path / name, (now - 5000, now - 5000))  # older than every image: still never swept

    budget = DiskBudget(tmp_path, max_bytes=5 * BLOCK, grace_seconds=60)
    assert budget.sweep(now) == 4 * BLOCK  # ten blocks over a budget of five: down to ≤ 80 %, oldest first
    assert sorted(p.name for p in tmp_path.glob("image-*")) == names[6:]
    assert all((tmp_path / name).stat().st_size == size for name, size in kept.items())
    assert budget.sweep(now) == 4 * BLOCK  # within budget: nothing more goes


def test_files_used_within_the_grace_period_survive_a_sweep_over_budget(tmp_path: Path) -> None:
    now = time.time()
    old, recent = [f"old-{i}.jpg" for i in range(4)], [f"new-{i}.jpg" for i in range(6)]
    _files(tmp_path, dict.fromkeys(old + recent, BLOCK),
           {**{n: now - 600 + i for i, n in enumerate(old)}, **{n: now - 30 + i for i, n in enumerate(recent)}})
    budget = DiskBudget(tmp_path, max_bytes=3 * BLOCK, grace_seconds=60)
    # every old file goes; the six just used stay although they take twice the budget
    assert budget.sweep(now) == 6 * BLOCK
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(recent)
    assert DiskBudget.touch(tmp_path / "new-0.jpg") and not DiskBudget.touch(tmp_path / "old-0.jpg")


def _cached_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.iterdir() if p.is_file() and not p.name.startswith("."))


def test_the_fetch_cache_stays_under_its_budget_and_refetches_an_evicted_image(
        http_files: HttpFiles, tmp_path: Path) -> None:
    images = {i: photo(i) for i in range(40)}
    (http_files.root / "img").mkdir()
    for i, data in images.items():
        (http_files.root / "img" / f"{i}.jpg").write_bytes(data)
    max_bytes = 200_000
    cache = tmp_path / "cache"
    fetcher = Fetcher(cache, max_bytes=max_bytes)
    fetcher.budget.grace_seconds = 0
    uris = [f"{http_files.base}/img/{i}.jpg" for i in range(40)]
    sizes = []
    for uri in uris:
        assert fetcher.local_path(uri).is_file()
        sizes.append(_cached_bytes(cache))
    # DiskBudget looks at the directory once a 32nd of the budget was added since its last look and leaves 80 %
    # of it, so one process's cache never exceeds the budget
    assert max(sizes) <= max_bytes, sizes
    assert sum(map(len, images.values())) > 2.5 * max_bytes  # the set does not fit: eviction had to happen
    by_bytes = {data: i for i, data in images.items()}
    cached = sorted(by_bytes[p.read_bytes()] for p in cache.iterdir() if p.suffix == ".jpg")
    assert 0 < len(cached) < 40 and not list(cache.glob("*.part"))
    # least recently used first: what is left are the images fetched last
    assert cached == list(range(40 - len(cached), 40))

    ref = ImageRef(key=uris[0], uri=uris[0], fetcher=fetcher)
    assert image_gets(http_files)["/img/0.jpg"] == 1
    assert ref.open().tobytes() == Image.open(io.BytesIO(images[0])).convert("RGB").tobytes()
    assert image_gets(http_files)["/img/0.jpg"] == 2  # evicted, so fetched again without the caller noticing
    assert image_gets(http_files)["/img/39.jpg"] == 1
    ImageRef(key=uris[39], uri=uris[39], fetcher=fetcher).open()
    assert image_gets(http_files)["/img/39.jpg"] == 1  # still cached: no second GET


# ------------------------------------------------------------------------------------------------ lazy sets
def test_a_lazily_read_set_fetches_no_image_while_loading(http_files: HttpFiles, tmp_path: Path) -> None:
    write_set(http_files.root, images=12)
    uri = f"{http_files.base}/train.csv"
    pairs = load_set("train", uri, DataSpec(train=uri, check_rows_up_to=0), Fetcher(tmp_path / "cache"))
    assert len(pairs) == 12 * CAPTIONS and pairs.skipped == 0
    assert image_gets(http_files) == {} and http_files.gets["/train.csv"] == 1
    assert [p.row for p in pairs.pairs[5:10]] == rows_of(1)
    assert {id(p.image) for p in pairs.pairs[5:10]} == {id(pairs.pairs[5].image)}  # one reference per image
    assert pairs.pairs[5].image.decoded is None


def test_a_lazy_run_with_loader_workers_fetches_each_image_once_and_learns(
        http_files: HttpFiles, tmp_path: Path) -> None:
    images = 40
    write_set(http_files.root, images)
    spec = tiny_spec(f"{http_files.base}/train.csv", data={"checkRowsUpTo": 0},
                     training={"numWorkers": 2, "learningRate": 2e-3})
    run = run_process(tmp_path, spec)
    assert run.code == 0, run.log[-4000:]
    pairs = images * CAPTIONS
    started = of_type(run.events, "started")[0]
    assert started.total_steps == 2 * (pairs // BATCH) and started.model_extra["train_pairs"] == pairs
    # every image a batch read was fetched once, by whichever worker came first; the other worker and the
    # second epoch read it from the disk cache
    read = {index // CAPTIONS for epoch in order_read(pairs, 2) for batch in epoch for index in batch}
    assert image_gets(http_files) == {f"/img/{i}.jpg": 1 for i in sorted(read)}
    loss = losses(run)
    # from ≈ln 32 plus the initial logit scale's excess; a mean of three steps smooths one batch's luck
    assert len(loss) == started.total_steps and loss[-1] < loss[0]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2
    assert of_type(run.events, "finished")


def first_bad_read(order: list[list[list[int]]], bad: set[int]) -> tuple[int, int]:
    """(step, row) of the first broken pair a run reads: steps count from 1 over the epochs, the row is the
    first broken one in that batch's order."""
    step = 0
    for epoch in order:
        for batch in epoch:
            step += 1
            met = [index for index in batch if index in bad]
            if met:
                return step, met[0] + 1
    raise AssertionError("no batch reads a broken pair")


@pytest.mark.usefixtures("every_step")
def test_a_broken_image_met_lazily_fails_the_run_at_that_batch_naming_its_row(tmp_path: Path) -> None:
    broken = [18]  # no row of it is in the first two batches of the seeded order
    train = write_set(tmp_path / "set", images=40, broken=broken)
    run = run_in_process(tmp_path, tiny_spec(str(train), data={"checkRowsUpTo": 0}))
    assert run.code == EXIT_BAD_DATA, run.log[-4000:]
    step, row = first_bad_read(order_read(40 * CAPTIONS, 2), bad_indices(broken))
    assert step == 3 and row in rows_of(18)
    failed, message = run.failed()
    assert failed.reason == "InvalidData" and failed.retryable is False
    assert f"train set, row {row}: image " in message and "img/18.jpg is unreadable" in message
    # it stops at the batch that met the row (trained or not: the check may come before that step's
    # collectives), not at the end of the epoch
    assert [p.step for p in of_type(run.events, "progress")][-1] in (step - 1, step)
    assert not of_type(run.events, "finished")


@pytest.mark.usefixtures("every_step")
def test_skipped_rows_met_lazily_are_counted_per_sample_read(tmp_path: Path) -> None:
    broken = [9]
    train = write_set(tmp_path / "set", images=40, broken=broken)
    # 8 broken samples of the 384 read (≈2 %): over the default limit of 1 %, within 10 %
    run = run_in_process(tmp_path, tiny_spec(str(train), data={"checkRowsUpTo": 0, "skipBadRows": True,
                                                                 "badRowLimit": 0.1}))
    assert run.code == 0, run.log[-4000:]
    # a sample whose pair is broken is trained on the next usable pair instead and counts once: so the count is
    # how many of the samples read across both epochs were broken pairs
    bad = bad_indices(broken)
    read = [index for epoch in order_read(40 * CAPTIONS, 2) for batch in epoch for index in batch]
    expected = sum(index in bad for index in read)
    assert expected == 8  # (its 5 rows, each read in one or both epochs as the seeded order drops the rest)
    progress = of_type(run.events, "progress")
    assert skipped_rows(progress[-1]) == expected
    counts = [skipped_rows(p) for p in progress]
    assert counts == sorted(counts) and counts[0] < expected  # counted as they are met, not up front
    assert started_skipped(run) == 0


@pytest.mark.usefixtures("every_step")
def test_too_many_bad_rows_met_lazily_fail_the_run_once_over_the_bad_row_limit(tmp_path: Path) -> None:
    broken = list(range(0, 40, 3))  # 14 of 40 images, never two in a row: 35 % of the rows
    train = write_set(tmp_path / "set", images=40, broken=broken)
    run = run_in_process(tmp_path, tiny_spec(str(train), data={"checkRowsUpTo": 0, "skipBadRows": True}))
    assert run.code == EXIT_BAD_DATA, run.log[-4000:]
    failed, message = run.failed()
    assert failed.reason == "InvalidData" and "over data.badRowLimit 0.01" in message
    assert "(first: row " in message
    # no judgement before 100 rows were read: the 4th batch of 32 is the first to reach it, and stops the run
    # (whether or not that batch is trained first)
    assert [p.step for p in of_type(run.events, "progress")] in ([1, 2, 3], [1, 2, 3, 4])


@pytest.mark.usefixtures("every_step")
def test_a_run_of_broken_rows_longer_than_the_replacement_window_is_counted_under_skip_bad_rows(
        tmp_path: Path) -> None:
    broken = [10, 11, 12, 13]  # rows 51 … 70: 20 broken pairs in a row, 10 % of the set
    train = write_set(tmp_path / "set", images=40, broken=broken)
    run = run_in_process(tmp_path, tiny_spec(str(train), data={"checkRowsUpTo": 0, "skipBadRows": True,
                                                                 "badRowLimit": 0.5}))
    assert run.code == 0, run.log[-4000:]
    assert skipped_rows(of_type(run.events, "progress")[-1]) >= CAPTIONS


@pytest.mark.usefixtures("every_step")
def test_a_set_under_the_check_threshold_fails_at_start_naming_its_broken_row(tmp_path: Path) -> None:
    train = write_set(tmp_path / "set", images=20, broken=[7])  # 100 rows, under checkRowsUpTo 5000
    run = run_in_process(tmp_path, tiny_spec(str(train)))
    assert run.code == EXIT_BAD_DATA, run.log[-4000:]
    failed, message = run.failed()
    assert failed.reason == "InvalidData"
    assert f"train set, row {rows_of(7)[0]}: image " in message and "img/7.jpg" in message
    assert not of_type(run.events, "progress") and not of_type(run.events, "started")


# ------------------------------------------------------------------------------------------------ webdataset
@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """40 images × 5 captions written by `kubetune data shard` as 4 shards of 10 images."""
    from kubetune.sdk.datatools import write_shards

    result = write_shards(str(write_set(tmp_path / "set", images=40)), str(tmp_path / "shards"), shard_size=10,
                          workers=2)
    assert (len(result.shards), result.images, result.pairs) == (4, 40, 200)
    return tmp_path / "shards"


def test_a_webdataset_run_streams_every_shard_with_loader_workers_and_learns(shards: Path, tmp_path: Path) -> None:
    manifest = json.loads((shards / "kubetune-shards.json").read_text())
    spec = tiny_spec(f"{shards}/", training={"numWorkers": 2, "learningRate": 2e-3})
    run = run_process(tmp_path / "run", spec)
    assert run.code == 0, run.log[-4000:]
    started = of_type(run.events, "started")[0]
    # an epoch is every pair once (one per caption), as on the CSV path: 200 pairs, 2 workers × 2 shards each
    assert started.model_extra["train_pairs"] == manifest["pairs"] == 200
    assert started.total_steps == 2 * (200 // BATCH)
    loss = losses(run)
    assert len(loss) == started.total_steps and loss[-1] < loss[0]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2
    assert of_type(run.events, "finished")


def test_a_validation_split_of_streamed_shards_is_refused(shards: Path, tmp_path: Path) -> None:
    run = run_in_process(tmp_path / "run", tiny_spec(f"{shards}/", data={"valSplit": 0.2}))
    assert run.code == EXIT_BAD_DATA, run.log[-4000:]
    failed, message = run.failed()
    assert failed.reason == "InvalidData"
    assert "data.valSplit cannot hold out part of a streamed (webdataset) set" in message
    assert not of_type(run.events, "started")


# ------------------------------------------------------------------------------------------------ DDP
DDP_BROKEN = 2  # the seeded order gives rank 1 alone a row of it in its first batch


@pytest.fixture(scope="module")
def ddp_bad_row(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, int]:
    """Two ranks (torchrun, gloo) read a set lazily until one of them meets a broken row; (run, that row)."""
    root = tmp_path_factory.mktemp("ddp-bad-row")
    first_batches = [order_read(40 * CAPTIONS, 1, world_size=2, rank=rank)[0][0] for rank in (0, 1)]
    bad = bad_indices([DDP_BROKEN])
    assert not bad & set(first_batches[0])  # rank 0 only learns of it from rank 1
    row = next(index for index in first_batches[1] if index in bad) + 1
    train = write_set(root / "set", images=40, broken=[DDP_BROKEN])
    spec = tiny_spec(str(train), data={"checkRowsUpTo": 0}, training={"collectiveTimeoutSeconds": 60})
    return run_process(root / "run", spec, nproc=2), row


def test_a_bad_row_met_by_one_rank_stops_both_ranks_at_the_same_step(ddp_bad_row: tuple[Run, int]) -> None:
    run, row = ddp_bad_row
    # both ranks leave after the first step's collective, long before a rank left waiting would time out
    assert run.seconds < 45, run.log[-4000:]
    failed, message = run.failed()  # rank 0's: it only knows that another rank met a bad row
    assert failed.reason == "InvalidData" and (failed.model_extra or {}).get("exit_code") == EXIT_BAD_DATA
    assert "another process met a bad row" in message
    assert [p.step for p in of_type(run.events, "progress")] in ([], [1])  # the first batch's, trained or not
    assert f"InvalidData: train set, row {row}: image " in run.log  # rank 1's log names it
    assert f"img/{DDP_BROKEN}.jpg is unreadable" in run.log


def test_a_bad_row_under_ddp_exits_with_the_bad_data_code(ddp_bad_row: tuple[Run, int]) -> None:
    run, _ = ddp_bad_row
    assert run.code == EXIT_BAD_DATA, run.log[-4000:]
