"""The trainer benches' own parts (bench.common, bench.data_scale, bench.trainer_vs_open_clip): their figures go
into the docs, so the parsing, the arithmetic, the goals and the data they generate are tested like product code."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.events import format_event

from bench import common
from bench.data_scale import evaluate_goals, summarize_side
from bench.trainer_vs_open_clip import ratios

# step lines as open_clip_train 3.x writes them (train.py), after a line that is not a step
OPEN_CLIP_LOG = """\
2026-12-03,10:00:00 | INFO | Start epoch 0
2026-12-03,10:00:05 | INFO | Train Epoch: 0 [  64/2560 (2%)] Data (t): 1.210 \
Batch (t): 3.500, 18.2857/s, 18.2857/s/gpu LR: 0.000250 Logit Scale: 14.286 \
Contrastive_loss: 4.1589 (4.1589) Loss: 4.1589 (4.1589)
2026-12-03,10:00:06 | INFO | Train Epoch: 0 [ 128/2560 (5%)] Data (t): 0.010 \
Batch (t): 0.250, 256.000/s, 256.000/s/gpu LR: 0.000500 Logit Scale: 14.286 \
Contrastive_loss: 4.1500 (4.1544) Loss: 4.1500 (4.1544)
2026-12-03,10:00:07 | INFO | Train Epoch: 1 [  64/2560 (2%)] Data (t): 0.900 \
Batch (t): 1.000, 64.0000/s, 64.0000/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 4.1 (4.1) Loss: 4.1 (4.1)
2026-12-03,10:00:08 | INFO | Train Epoch: 1 [ 128/2560 (5%)] Data (t): 0.010 \
Batch (t): 0.500, 128.000/s, 128.000/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 4.1 (4.1) Loss: 4.1 (4.1)
"""


def test_open_clip_lines_give_each_steps_rate_and_each_epoch_drops_its_own_warmup() -> None:
    steps = common.open_clip_steps(OPEN_CLIP_LOG.splitlines())
    assert [(s.epoch, s.samples, s.batch_s) for s in steps] == [(0, 64, 3.5), (0, 128, 0.25), (1, 64, 1.0),
                                                                (1, 128, 0.5)]
    assert steps[0].data_s == 1.21 and steps[0].samples_per_second == pytest.approx(18.2857)
    # each open_clip epoch starts its loader again: its first line is warm-up, like the run's first
    assert common.open_clip_step_rates(steps, warmup=1) == [256.0, 128.0]
    assert common.open_clip_step_rates(steps, warmup=0) == [pytest.approx(18.2857), 256.0, 64.0, 128.0]


def test_kubetune_rates_come_from_consecutive_progress_events_after_warmup() -> None:
    lines = ["human log line", format_event("started", step=0, time=99.0)]
    times = {1: 104.0, 2: 105.0, 3: 105.5, 4: 106.0, 6: 108.0, 7: 108.25}  # step 5's event is missing
    lines += [format_event("progress", step=step, time=t) for step, t in times.items()]
    lines.append(format_event("metrics", step=7, time=109.0))
    progress = common.kubetune_progress(lines)
    assert progress == list(times.items())
    assert common.first_step_seconds(progress, started=100.0) == 4.0
    # 64 samples per step: steps 3, 4 and 7 (6 follows a gap: its interval spans two steps, so it is not a rate)
    assert common.kubetune_step_rates(progress, 64, warmup=2) == [128.0, 128.0, 256.0]
    assert common.first_step_seconds([], started=100.0) is None


def test_summary_is_median_min_max_and_spread_of_what_was_measured() -> None:
    assert common.summarize([10.0, None, 30.0, 20.0]) == {"median": 20.0, "min": 10.0, "max": 30.0,
                                                          "spread_pct": 100.0, "n": 3}
    assert common.summarize([None, float("nan")]) is None
    runs: list[dict[str, Any]] = [{"status": "ok", "steady_samples_per_s": 100.0, "first_step_s": 5.0},
            {"status": "unavailable: trainer exit 1: boom"},
            {"status": "ok", "steady_samples_per_s": 120.0, "first_step_s": 7.0}]
    side = summarize_side(runs)
    assert side["steady_samples_per_s"]["median"] == 110.0 and side["first_step_s"]["n"] == 2
    assert side["failed_repeats"] == ["unavailable: trainer exit 1: boom"]
    assert summarize_side(runs[1:2]) == {"unavailable": "unavailable: trainer exit 1: boom"}


def _figures(first: float, pss: float, rate: float, over: float = -1.0, cache_over: float = 0.0) -> dict[str, Any]:
    return {"first_step_s": common.summarize([first]), "tree_peak_pss_bytes": common.summarize([pss]),
            "steady_samples_per_s": common.summarize([rate]), "disk_over_budget_bytes": common.summarize([over]),
            "cache_over_size_bytes": common.summarize([cache_over])}


def test_goals_pass_fail_and_not_applicable() -> None:
    summary = {
        "kubetune-csv": {"100": _figures(10.0, 1.0e9, 95.0), "400": _figures(11.9, 1.19e9, 180.0, cache_over=1.0)},
        "kubetune-webdataset": {"100": _figures(10.0, 1.0e9, 80.0), "400": _figures(12.5, 1.6e9, 200.0, over=5.0)},
        "open_clip-webdataset": {"100": _figures(9.0, 1.0e9, 100.0), "400": _figures(9.0, 1.0e9, 200.0)},
    }
    goals = {(g["side"], g["id"]): g for g in evaluate_goals(summary, [100, 400])}
    csv, wds = "kubetune-csv", "kubetune-webdataset"
    assert goals[(csv, "first_step_growth")]["pass"] is True
    assert goals[(csv, "first_step_growth")]["value"] == pytest.approx(1.19)
    assert goals[(wds, "first_step_growth")]["pass"] is False  # 1.25×
    assert goals[(csv, "pss_growth")]["pass"] is True and goals[(wds, "pss_growth")]["pass"] is False
    assert goals[(csv, "pss_limit")]["pass"] is True and goals[(wds, "pss_limit")]["pass"] is False  # 1.6 GB
    assert goals[(csv, "disk_budget")]["pass"] is True and goals[(wds, "disk_budget")]["pass"] is False
    assert goals[(csv, "cache_budget")]["pass"] is False and goals[(wds, "cache_budget")]["pass"] is True  # at 0
    # the worst size's ratio counts: 95/100 at 100 pairs passes, 180/200 at 400 pairs is exactly the limit
    assert goals[(csv, "throughput")]["value"] == pytest.approx(0.9) and goals[(csv, "throughput")]["pass"] is True
    assert goals[(wds, "throughput")]["value"] == pytest.approx(0.8) and goals[(wds, "throughput")]["pass"] is False

    summary[wds] = {"100": {"unavailable": "unavailable: trainer exit 65: no shards"}, "400": _figures(1, 1, 1)}
    for goal in evaluate_goals(summary, [100, 400]):
        if goal["side"] == wds:
            assert goal["pass"] is None, goal  # never measured: neither passed nor failed
            assert goal["note"] == "unavailable at 100 pairs: trainer exit 65: no shards"


def test_ratios_divide_medians_and_skip_unavailable_sides() -> None:
    summary: dict[str, dict[str, Any]] = {"kubetune-csv": {"steady_samples_per_s": {"median": 150.0}},
               "open_clip-csv": {"steady_samples_per_s": {"median": 100.0}},
               "open_clip-webdataset": {"unavailable": "x"}}
    out = ratios(summary)
    assert out["kubetune-csv / open_clip-csv"] == 1.5
    assert out["kubetune-csv / open_clip-webdataset"] is None and out["kubetune-webdataset / open_clip-csv"] is None


def test_proc_parsers_and_process_tree() -> None:
    assert common.pss_bytes("Rss:   1736 kB\nPss:    369 kB\nPss_Dirty: 112 kB\n") == 369 * 1024
    assert common.rss_bytes("Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  800 kB\n") == 800 * 1024
    assert common.pss_bytes("") is None
    assert common.parent_of("4242 (pt_data_worker 0) S 4200 4242 4200 0 -1") == 4200
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1}
    assert sorted(common.descendants(10, parents)) == [10, 11, 12, 13]


def test_sampler_sees_a_childs_memory(tmp_path: Path) -> None:
    script = "import sys; x = b'k' * (64 << 20); print('ready', flush=True); sys.stdin.readline()"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        (tmp_path / "f").write_bytes(b"x" * 10_000)
        sampler = common.TreeSampler(child.pid, {"tmp": tmp_path})
        sampler.sample_memory()
        sampler.sample_disk()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    peaks = sampler.peaks
    assert peaks.tree_pss >= 64 << 20 and peaks.main_rss >= 64 << 20 and peaks.processes == 1
    assert peaks.disk["tmp"] >= 10_000


def test_generated_images_are_realistic_jpegs_with_distinct_captions(tmp_path: Path) -> None:
    directory = common.generate_images(tmp_path, 6, processes=1)
    sizes = [(directory / common.image_name(i)).stat().st_size for i in range(6)]
    assert all(8_000 < s < 25_000 for s in sizes), sizes
    assert (directory / common.image_name(0)).read_bytes()[:2] == b"\xff\xd8"
    texts = common.captions(common.layout(3))
    assert len(set(texts)) == 5 and texts == common.captions(common.layout(3))  # deterministic per image
    rows = common.pair_rows(2, lambda i: f"s3://b/{i}.jpg")
    assert [uri for _, uri in rows] == ["s3://b/0.jpg"] * 5 + ["s3://b/1.jpg"] * 5


def test_fallback_shards_follow_the_data_contract(tmp_path: Path) -> None:
    images = common.generate_images(tmp_path, 3, processes=1)
    index = common.write_shards(tmp_path / "set", images, 3, shard_size=2, source="s3://b/pairs.csv")
    assert json.loads((tmp_path / "set" / "sizes.json").read_text()) == {"shard-000000.tar": 2,
                                                                         "shard-000001.tar": 1}
    assert index == json.loads((tmp_path / "set" / "kubetune-shards.json").read_text())
    assert index["images"] == 3 and index["pairs"] == 15 and index["shards"][1] == {
        "name": "shard-000001.tar", "images": 1, "pairs": 5}
    with tarfile.open(tmp_path / "set" / "shard-000001.tar") as tar:
        assert tar.getnames() == ["000000002.jpg", "000000002.txt", "000000002.json"]
        meta = json.loads(tar.extractfile("000000002.json").read())  # type: ignore[union-attr]
        first = tar.extractfile("000000002.txt").read().decode()  # type: ignore[union-attr]
        jpeg = tar.extractfile("000000002.jpg").read()  # type: ignore[union-attr]
    assert meta == {"captions": common.captions(common.layout(2)), "rows": [11, 12, 13, 14, 15]}
    assert first == meta["captions"][0]
    assert jpeg == (images / common.image_name(2)).read_bytes()  # the JPEG as it was
