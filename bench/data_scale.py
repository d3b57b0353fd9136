"""Data at scale: does the trainer's start, memory and disk stay flat as the data set grows, and does it keep up
with open_clip_train's own WebDataset loader?

    python -m bench.data_scale [--pairs 10000 50000 200000] [--repeats 3] [--steps 40] [--json PATH]
    python -m bench.data_scale --smoke          # tiny sizes, one repeat, 8 steps: checks the bench itself

Data: 224 px JPEGs (random shapes, colours and noise, 10–20 KB each) with five captions per image, so N pairs are
N/5 images; generated once into ``--data-dir`` and reused. A SeaweedFS of the bench's own (``private_s3``, real
access keys) holds, per size, a CSV of (caption, s3:// image URI) rows and WebDataset shards per the data
contract (``kubetune data shard`` when the CLI has it, else the bench's writer of the same layout; the JSON says
which).

Sides, interleaved within every repeat (size by size, the side order rotating between repeats):

- ``kubetune-csv``: the trainer in local mode on the CSV, read lazily (``data.checkRowsUpTo: 0``) from S3;
- ``kubetune-webdataset``: the trainer on the shard prefix (``data.format: webdataset``) on the same S3;
- ``open_clip-webdataset``: ``python -m open_clip_train.main --dataset-type webdataset --dataset-resampled
  --train-num-samples steps × batch`` on the same shards, fetched from the same S3 over HTTP by webdataset's
  own ``curl`` (one presigned URL per shard). ``--dataset-resampled`` makes its epoch exactly the requested
  number of batches whatever the shard count (without it, 2 shards and 2 workers at 10 000 pairs end the epoch
  after 30 steps); it only changes which shard a worker opens next.

All sides: the same model config, batch size, loader workers, OMP/MKL threads (and taskset), fp32 on the CPU.
Measured per run, with the process tree sampled every 0.2 s:

- time from the process start to the first optimizer step (kubetune: the first ``progress`` event with step ≥ 1,
  by its own timestamp; open_clip: the arrival of its first ``Train Epoch`` line);
- peak memory: the main process's RSS, and the peak of Σ PSS over the whole tree (``/proc/<pid>/smaps_rollup``):
  PSS splits a shared page between the processes mapping it, so forked loader workers are not double-counted as
  Σ RSS would (Σ RSS is recorded too, for comparison);
- peak local disk of the trainer's work dir (sampled every second, as ``du`` counts blocks);
- steady samples/s: the median over the steps after the first ``--warmup`` of each step's own rate (kubetune: one
  progress event per step, KUBETUNE_PROGRESS_SECONDS=0, batch ÷ the time between consecutive events; open_clip:
  its per-step log line, ``--log-every-n-steps 1``). Both time whole iterations (data wait included).

Every raw repeat, the median/min/max/spread per (size, side), the goals, the machine's load (before and after)
and the versions go to ``--json`` (default bench/results/data-scale.json). A side that cannot run (e.g. the
trainer's webdataset path not there yet) is reported as ``unavailable: <reason>`` and its goals as n/a.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

SIDES = ("kubetune-csv", "kubetune-webdataset", "open_clip-webdataset")
KUBETUNE_SIDES = SIDES[:2]
BUCKET = "bench"
PSS_LIMIT_BYTES = 1.5e9  # "peak PSS < 1.5 GB": decimal GB
GROWTH_LIMIT = 1.2
THROUGHPUT_RATIO = 0.9
DEFAULT_JSON = ROOT / "bench" / "results" / "data-scale.json"


@dataclass(frozen=True)
class Settings:
    steps: int
    warmup: int
    batch: int
    workers: int
    threads: int
    model: str
    shard_size: int
    cache_size: str
    captions: int

    def epochs_for(self, pairs: int) -> int:
        """Enough epochs for ``steps`` (maxSteps stops the run there)."""
        return max(1, math.ceil(self.steps / max(1, pairs // self.batch)))


# ------------------------------------------------------------------------------------------------ goals (pure)
def _median(summary: dict[str, Any] | None) -> float | None:
    return None if summary is None else summary.get("median")


def _row(name: str, goal: str, side: str, value: float | None, limit: float, ok: bool | None,
         note: str = "") -> dict[str, Any]:
    return {"id": name, "goal": goal, "side": side, "value": None if value is None else round(value, 4), "limit": limit,
            "pass": ok, **({"note": note} if note else {})}


def unavailable_note(per_size: dict[str, dict[str, Any]], missing: list[str], who: str = "") -> str:
    """One line for the sizes a side could not run: the sizes and the first one's reason."""
    if not missing:
        return ""
    reason = str(per_size.get(missing[0], {}).get("unavailable", "not run")).removeprefix("unavailable: ")
    return f"{who}unavailable at {', '.join(missing)} pairs: {reason}"


def evaluate_goals(summary: dict[str, dict[str, dict[str, Any]]], sizes: list[int]) -> list[dict[str, Any]]:
    """The bench's goals from ``summary[side][str(pairs)]`` (figures as :func:`common.summarize` gives them, or
    ``{"unavailable": reason}``); ``pass`` is None where a figure is missing."""
    small, large = str(min(sizes)), str(max(sizes))
    oc = summary.get("open_clip-webdataset", {})
    rows: list[dict[str, Any]] = []
    for side in KUBETUNE_SIDES:
        per_size = summary.get(side, {})
        missing = [p for p in map(str, sizes) if "unavailable" in per_size.get(p, {"unavailable": "not run"})]
        note = unavailable_note(per_size, missing)
        for name, figure, what in (("first_step_growth", "first_step_s", "time to first step"),
                                   ("pss_growth", "tree_peak_pss_bytes", "peak PSS")):
            a, b = _median(per_size.get(small, {}).get(figure)), _median(per_size.get(large, {}).get(figure))
            ratio = b / a if a and b is not None else None
            rows.append(_row(name, f"{what} grows ≤ {GROWTH_LIMIT}× from {small} to {large} pairs (median ratio)", side,
                             ratio, GROWTH_LIMIT, None if ratio is None else ratio <= GROWTH_LIMIT, note))
        peaks = [s["tree_peak_pss_bytes"]["max"] for s in per_size.values() if s.get("tree_peak_pss_bytes")]
        worst = max(peaks) if peaks and not missing else None
        rows.append(_row("pss_limit", "peak PSS < 1.5 GB at every size (worst repeat)", side, worst, PSS_LIMIT_BYTES,
                         None if worst is None else worst < PSS_LIMIT_BYTES, note))
        for name, figure, goal in (
                ("disk_budget", "disk_over_budget_bytes", "work-dir disk ≤ cacheSize + checkpoint + artifact"),
                ("cache_budget", "cache_over_size_bytes", "the trainer's data cache dir ≤ cacheSize")):
            over = [s[figure]["max"] for s in per_size.values() if s.get(figure)]
            worst_over = max(over) if over and not missing else None
            rows.append(_row(name, f"{goal} at every size (worst repeat, bytes over)", side, worst_over, 0,
                             None if worst_over is None else worst_over <= 0, note))
        ratios = []
        for pairs in map(str, sizes):
            kt, ref = _median(per_size.get(pairs, {}).get("steady_samples_per_s")), _median(
                oc.get(pairs, {}).get("steady_samples_per_s"))
            ratios.append(kt / ref if kt is not None and ref else None)
        measured = [r for r in ratios if r is not None]
        worst_ratio = min(measured) if measured and len(measured) == len(ratios) else None
        oc_missing = [p for p in map(str, sizes) if "unavailable" in oc.get(p, {"unavailable": "not run"})]
        why = "; ".join(x for x in (note, unavailable_note(oc, oc_missing, "open_clip ")) if x)
        rows.append(_row("throughput", f"samples/s ≥ {THROUGHPUT_RATIO}× open_clip's webdataset loader at every "
                         "size (worst median ratio)", side, worst_ratio, THROUGHPUT_RATIO,
                         None if worst_ratio is None else worst_ratio >= THROUGHPUT_RATIO, why))
    return rows


def summarize_side(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max/spread of each figure over the repeats that ran; unavailable when none did."""
    ran = [r for r in repeats if r.get("status") == "ok"]
    if not ran:
        return {"unavailable": next((r["status"] for r in repeats), "not run")}
    figures = ("first_step_s", "steady_samples_per_s", "main_peak_rss_bytes", "tree_peak_pss_bytes",
               "tree_peak_rss_bytes", "work_dir_peak_bytes", "disk_over_budget_bytes", "cache_dir_peak_bytes",
               "cache_over_size_bytes", "wall_s")
    out: dict[str, Any] = {name: common.summarize([r.get(name) for r in ran]) for name in figures}
    out = {k: v for k, v in out.items() if v is not None}
    if len(ran) < len(repeats):
        out["failed_repeats"] = [r["status"] for r in repeats if r.get("status") != "ok"]
    return out


def format_goal(row: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "n/a "}[row["pass"]]
    value = "-" if row["value"] is None else f"{row['value']:.4g}"
    note = f"  ({row['note']})" if row.get("note") else ""
    return f"{verdict}  {row['side']:<22} {row['goal']}: {value} (limit {row['limit']:.4g}){note}"


# ------------------------------------------------------------------------------------------------ data
def prepare_local(data_dir: Path, sizes: list[int], settings: Settings) -> dict[int, dict[str, Any]]:
    """Images for the largest size, and per size a local CSV (for the shard writer) and its shards."""
    per_image = settings.captions
    images = {pairs: max(1, pairs // per_image) for pairs in sizes}
    image_dir = common.generate_images(data_dir, max(images.values()))
    out: dict[int, dict[str, Any]] = {}
    for pairs, count in images.items():
        local_csv = data_dir / "csv" / f"local-{count}x{per_image}.csv"
        if not local_csv.is_file():
            common.write_csv(local_csv, common.pair_rows(count, lambda i: str(image_dir / common.image_name(i)),
                                                         per_image))
        shards = data_dir / "shards" / f"images-{count}x{per_image}-per-{settings.shard_size}"
        written_by = common.make_shards(shards, local_csv, image_dir, count, settings.shard_size, per_image)
        out[pairs] = {"images": count, "pairs": count * per_image, "local_csv": local_csv, "shards": shards,
                      "shards_written_by": written_by}
    return out


def upload(client: Any, image_dir: Path, local: dict[int, dict[str, Any]], per_image: int, work: Path) -> None:
    """Images once; per size the S3 CSV (s3:// image URIs) and the shards (kubetune-shards.json last)."""
    client.make_bucket(BUCKET)
    count = max(entry["images"] for entry in local.values())
    started = time.perf_counter()

    def put(path: Path, key: str) -> None:
        for attempt in range(3):  # the client does not retry (kubetune's store does, above it)
            try:
                client.fput_object(BUCKET, key, str(path))
                return
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(1)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: put(image_dir / common.image_name(i), f"images/{common.image_name(i)}"),
                      range(count)))
        for entry in local.values():
            name = f"pairs-{entry['pairs']}"
            csv_path = common.write_csv(work / f"{name}.csv", common.pair_rows(
                entry["images"], lambda i: f"s3://{BUCKET}/images/{common.image_name(i)}", per_image))
            put(csv_path, f"csv/{name}.csv")
            tars = sorted(entry["shards"].glob("*.tar"))
            list(pool.map(lambda p, n=name: put(p, f"wds/{n}/{p.name}"), tars))
            put(entry["shards"] / "sizes.json", f"wds/{name}/sizes.json")
            put(entry["shards"] / "kubetune-shards.json", f"wds/{name}/kubetune-shards.json")
            entry["csv_uri"] = f"s3://{BUCKET}/csv/{name}.csv"
            entry["wds_uri"] = f"s3://{BUCKET}/wds/{name}/"
            entry["shard_urls"] = [client.presigned_get_object(BUCKET, f"wds/{name}/{p.name}",
                                                               expires=timedelta(days=1)) for p in tars]
    print(f"uploaded {count} images and {len(local)} sets in {time.perf_counter() - started:.0f}s", flush=True)


# ------------------------------------------------------------------------------------------------ one run
def files_bytes(root: Path, part: str) -> int:
    """Bytes of the files under ``root/part`` (the run's checkpoints or artifact in its local store)."""
    return sum(p.stat().st_size for p in (root / part).rglob("*") if p.is_file()) if (root / part).exists() else 0


def run_kubetune(side: str, entry: dict[str, Any], settings: Settings, server: Any, work: Path,
                 tag: str) -> dict[str, Any]:
    out_dir = work / f"out-{tag}"
    data: dict[str, Any] = {"cacheSize": settings.cache_size}
    if side == "kubetune-csv":
        data.update(train=entry["csv_uri"], format="csv", checkRowsUpTo=0)
    else:
        data.update(train=entry["wds_uri"], format="webdataset")
    run_file = common.kubetune_run_file(work / f"run-{tag}.yaml", settings.model, data, settings.steps,
                                        settings.epochs_for(entry["pairs"]), settings.batch, settings.workers,
                                        output={"endpoint": server.host_endpoint})
    env = common.env_for(settings.threads, AWS_ACCESS_KEY_ID=server.access_key,
                         AWS_SECRET_ACCESS_KEY=server.secret_key)
    measured = common.run_measured(common.kubetune_cmd(run_file, out_dir, settings.threads), env,
                                   work / "logs" / f"{tag}.log",
                                   {"work_dir": out_dir / ".work", "cache_dir": out_dir / ".work" / "cache"})
    progress = common.kubetune_progress(text for _, text in measured.lines)
    record = _memory(measured)
    if measured.rc != 0 or not progress:
        common.remove_tree(out_dir)
        record["status"] = f"unavailable: trainer exit {measured.rc}: {common.failure_reason(measured.lines)}"
        return record
    rates = common.kubetune_step_rates(progress, settings.batch, settings.warmup)
    checkpoint = max((p.stat().st_size for p in (out_dir / "checkpoints").glob("*.pt")), default=0)
    artifact = files_bytes(out_dir, "artifact")
    common.remove_tree(out_dir)
    cache_size = common.parse_cache_size(settings.cache_size)
    budget = cache_size + checkpoint + artifact
    peak, cache_peak = measured.peaks.disk["work_dir"], measured.peaks.disk["cache_dir"]
    record.update(status="ok", first_step_s=common.first_step_seconds(progress, measured.started),
                  steady_samples_per_s=common.median_or_none(rates), steps_timed=len(rates),
                  step_rates=[round(r, 2) for r in rates], steps=progress[-1][0], work_dir_peak_bytes=peak,
                  checkpoint_bytes=checkpoint, artifact_bytes=artifact, disk_budget_bytes=budget,
                  disk_over_budget_bytes=peak - budget, cache_dir_peak_bytes=cache_peak,
                  cache_over_size_bytes=cache_peak - cache_size)
    return record


def run_open_clip(entry: dict[str, Any], settings: Settings, model_dir: Path, work: Path, tag: str) -> dict[str, Any]:
    logs = work / f"oc-logs-{tag}"
    data = ["--train-data", "::".join(entry["shard_urls"]), "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(settings.steps * settings.batch)]
    cmd = common.open_clip_cmd(model_dir, logs, data, settings.batch, settings.workers, settings.threads)
    measured = common.run_measured(cmd, common.env_for(settings.threads), work / "logs" / f"{tag}.log",
                                   {"logs": logs})
    steps = common.open_clip_steps(text for _, text in measured.lines)
    record = _memory(measured)
    if measured.rc != 0 or not steps:
        record["status"] = f"unavailable: open_clip_train exit {measured.rc}: {common.failure_reason(measured.lines)}"
        return record
    first = next(t for t, text in measured.lines if common.OPEN_CLIP_STEP.search(text))
    rates = common.open_clip_step_rates(steps, settings.warmup)
    record.update(status="ok", first_step_s=first - measured.started,
                  steady_samples_per_s=common.median_or_none(rates), steps_timed=len(rates),
                  step_rates=[round(r, 2) for r in rates], steps=len(steps))
    common.remove_tree(logs)
    return record


def _memory(measured: common.Measured) -> dict[str, Any]:
    peaks = measured.peaks
    return {"rc": measured.rc, "wall_s": round(measured.wall_s, 2), "main_peak_rss_bytes": peaks.main_rss,
            "tree_peak_pss_bytes": peaks.tree_pss, "tree_peak_rss_bytes": peaks.tree_rss,
            "processes_max": peaks.processes, "memory_samples": peaks.samples}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (kubetune maxSteps)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady samples/s")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers (both trainers)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads and taskset CPUs (both trainers)")
    parser.add_argument("--model", choices=sorted(common.MODELS), default="tiny")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--cache-size", default="32Mi",
                        help="the trainer's data.cacheSize: by default below the ≈ 40 MB of images a 40-step CSV run "
                             "fetches (so eviction happens) and above the two ≈ 15 MB shards a webdataset run with 2 "
                             "workers holds open")
    parser.add_argument("--captions", type=int, default=common.CAPTIONS_PER_IMAGE, help="captions per image")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR, help="generated data, reused")
    parser.add_argument("--json", type=Path, default=None, help=f"results (default {DEFAULT_JSON}; smoke: none)")
    parser.add_argument("--smoke", action="store_true",
                        help="200 and 400 pairs, 1 repeat, 8 steps of 16, 20-image shards: checks the bench")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.repeats, args.steps, args.warmup, args.batch, args.shard_size = [200, 400], 1, 8, 2, 16, 20
    elif args.json is None:
        args.json = DEFAULT_JSON
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.cluster.s3 import private_s3

    settings = Settings(args.steps, args.warmup, args.batch, args.workers, args.threads, args.model,
                        args.shard_size, args.cache_size, args.captions)
    sizes = sorted(set(args.pairs))
    load_before = os.getloadavg()
    local = prepare_local(args.data_dir, sizes, settings)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {side: {str(p): [] for p in sizes} for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="kt-data-scale-") as tmp:
        work = Path(tmp)
        with private_s3(work / "s3") as server:
            client = common.s3_client(server)
            upload(client, args.data_dir / "jpeg-224", local, settings.captions, work)
            model_dir = common.open_clip_model_dir(work, settings.model)
            for repeat in range(args.repeats):
                for pairs in sizes:
                    shift = repeat % len(args.sides)
                    for side in args.sides[shift:] + args.sides[:shift]:  # no side always first or last
                        tag = f"{side}-{pairs}-{repeat}"
                        entry = local[pairs]
                        if side == "open_clip-webdataset":
                            record = run_open_clip(entry, settings, model_dir, work, tag)
                        else:
                            record = run_kubetune(side, entry, settings, server, work, tag)
                        record.update(side=side, pairs=pairs, repeat=repeat)
                        raw[side][str(pairs)].append(record)
                        print(common.json_line({k: v for k, v in record.items() if k != "step_rates"}), flush=True)
    summary = {side: {p: summarize_side(runs) for p, runs in per_size.items()} for side, per_size in raw.items()}
    goals = evaluate_goals(summary, sizes)
    result: dict[str, Any] = {
        "bench": "data_scale", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
        "settings": {**settings.__dict__, "pairs": sizes, "repeats": args.repeats, "image_px": 224,
                     "memory_interval_s": 0.2, "disk_interval_s": 1.0},
        "data": {str(p): {"images": e["images"], "pairs": e["pairs"], "csv": e.get("csv_uri"),
                          "shards": e.get("wds_uri"), "shards_written_by": e["shards_written_by"]}
                 for p, e in local.items()},
        "open_clip_reads": "the same shards from the same SeaweedFS over HTTP (presigned URLs, webdataset's curl)",
        "memory_note": ("tree_peak_pss_bytes: peak of Σ PSS over the process tree (smaps_rollup), which splits "
                        "pages shared by forked loader workers instead of counting them once per process as Σ RSS "
                        "(tree_peak_rss_bytes) does; main_peak_rss_bytes: the main process alone"),
        "machine": common.machine(load_before), "versions": common.versions(),
        "summary": summary, "goals": goals, "raw": raw,
    }
    if args.smoke:
        print("smoke: sizes and step counts far too small for these verdicts to mean anything about the trainer")
    for row in goals:
        print(format_goal(row))
    if args.json:
        common.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
