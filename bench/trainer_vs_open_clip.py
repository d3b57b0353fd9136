"""Side by side: kubetune's trainer vs ``python -m open_clip_train.main``, steady-state training throughput.

    python -m bench.trainer_vs_open_clip [--repeats 5] [--steps 60] [--json PATH]
    python -m bench.trainer_vs_open_clip --smoke      # 8 steps of 16, one repeat: checks the bench itself

Data: ``steps × batch`` pairs on local disk: 224 px JPEGs (random shapes, colours and noise, 10–20 KB each) with
five captions per image (bench.common, cached in ``--data-dir``), as a CSV of one row per pair and as WebDataset
shards of the same images per the data contract. So every side trains on the same images, each about five times.

Sides, interleaved (kubetune-csv, open_clip-csv, open_clip-webdataset, kubetune-webdataset, then the same rotated
by one, …), ``--repeats`` runs each:

- ``kubetune-csv``: ``python -m kubetune_trainer`` in local mode on the CSV (``maxSteps: steps``);
- ``open_clip-csv``: ``--dataset-type csv`` on the same rows (a TSV with its column names): one epoch = ``steps``;
- ``open_clip-webdataset``: ``--dataset-type webdataset --dataset-resampled --train-num-samples steps × batch`` on
  the shards (resampled so that its epoch is exactly ``steps`` batches whatever the shard count);
- ``kubetune-webdataset``: the trainer on the shard directory (``data.format: webdataset``); reported as
  ``unavailable: <reason>`` while the trainer cannot read shards.

Same model config, batch, loader workers, OMP/MKL threads (and taskset to that many CPUs), fp32 on the CPU, the
same optimizer settings. Throughput is each trainer's own per-step timing after ``--warmup`` steps (kubetune: one
``progress`` event per step, batch ÷ the time between consecutive events; open_clip: its per-step log line with
``--log-every-n-steps 1``), both whole iterations (data wait included); per run the median over the timed
steps, per side the median, min, max and spread over the runs. The JSON (default
bench/results/trainer-vs-open-clip.json) holds every raw run, the summary, the ratios kubetune ÷ open_clip, the
machine's load before and after, the versions and a ``differences`` sentence: what differs between the sides.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

SIDES = ("kubetune-csv", "open_clip-csv", "open_clip-webdataset", "kubetune-webdataset")
DEFAULT_JSON = ROOT / "bench" / "results" / "trainer-vs-open-clip.json"
DEFAULT_CHECK_ROWS = 5000  # spec.data.checkRowsUpTo's default
DEFAULT_SHUFFLE_BUFFER = 1000  # spec.data.shuffleBuffer's default


def differences(args: argparse.Namespace, rows: int, images: int, memory_budget: int | None) -> str:
    """What differs between the sides, as the code paths read (open_clip_train's installed code and the trainer
    at the version recorded beside it); nothing here was measured."""
    check_rows = DEFAULT_CHECK_ROWS if args.kubetune_check_rows is None else args.kubetune_check_rows
    decoded = images * 224 * 224 * 3
    kept = (f"keeps them decoded in memory ({decoded >> 20} MiB, within its {memory_budget >> 20} MiB budget), so "
            f"its loader workers only run the transform" if memory_budget is not None and decoded <= memory_budget else
            "keeps those that fit its in-memory budget decoded (the others are decoded again when read)")
    eager = (f"kubetune-csv fetches, decodes and validates every image before its first step (the CSV's {rows} rows "
             f"≤ checkRowsUpTo {check_rows}) and {kept}, while open_clip-csv opens and decodes the JPEG at every "
             f"read (CsvDataset)" if rows <= check_rows else
             f"kubetune-csv reads the CSV's {rows} rows lazily (checkRowsUpTo {check_rows}), decoding each image when "
             f"read, as open_clip-csv does at every read (CsvDataset)")
    return (
        f"Common: model config '{args.model}', batch {args.batch}, {args.workers} loader workers, {args.threads} "
        f"OMP/MKL threads (taskset to {args.threads} CPUs where present), fp32 on the CPU, lr 5e-4, weight decay "
        f"0.2, 2 warm-up steps of the LR schedule, the same {images} images (224 px JPEG, {args.captions} captions "
        f"each) from local disk; every side tokenizes captions in its loader workers. Differences: (1) {eager}. "
        f"(2) open_clip-csv uses a DataLoader without persistent workers (they start again every epoch; one epoch "
        f"here, so only its first steps, inside the warm-up, pay for it); open_clip-webdataset's and kubetune's "
        f"loaders keep their workers. (3) open_clip-webdataset makes one pair per shard sample (the image and its "
        f"first caption, .txt), picks shards with replacement (--dataset-resampled) and shuffles in a 5000-sample "
        f"buffer (1000 before the first batch); kubetune-webdataset makes one pair per caption of each sample "
        f"({args.captions} here, per the data contract) and shuffles within data.shuffleBuffer "
        f"({DEFAULT_SHUFFLE_BUFFER}) pairs per worker. (4) kubetune's AdamW runs torch's fused kernel, open_clip's "
        f"the default one. (5) kubetune runs each sample's augmentation under a seed of its own (exact resume), "
        f"open_clip on the workers' RNG. (6) Both write one line per step (kubetune a JSON progress event, open_clip "
        f"its log line); both time whole iterations, the data wait included.")


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Median samples/s of each kubetune side ÷ each open_clip side."""
    def median(side: str) -> float | None:
        figure = summary.get(side, {}).get("steady_samples_per_s")
        return figure["median"] if figure else None

    out: dict[str, float | None] = {}
    for kt in ("kubetune-csv", "kubetune-webdataset"):
        for oc in ("open_clip-csv", "open_clip-webdataset"):
            a, b = median(kt), median(oc)
            out[f"{kt} / {oc}"] = round(a / b, 3) if a is not None and b else None
    return out


def summarize_side(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in repeats if r.get("status") == "ok"]
    if not ran:
        return {"unavailable": next((r["status"] for r in repeats), "not run")}
    out: dict[str, Any] = {}
    for name in ("steady_samples_per_s", "first_step_s", "tree_peak_pss_bytes", "wall_s"):
        figure = common.summarize([r.get(name) for r in ran])
        if figure is not None:
            out[name] = figure
    if len(ran) < len(repeats):
        out["failed_repeats"] = [r["status"] for r in repeats if r.get("status") != "ok"]
    return out


# ------------------------------------------------------------------------------------------------ runs
def run_side(side: str, files: dict[str, Any], args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    env = common.env_for(args.threads)
    if side.startswith("kubetune"):
        out_dir = work / f"out-{tag}"
        if side == "kubetune-csv":
            data: dict[str, Any] = {"train": str(files["kt_csv"]), "format": "csv"}
            if args.kubetune_check_rows is not None:
                data["checkRowsUpTo"] = args.kubetune_check_rows
        else:
            data = {"train": f"{files['shards']}/", "format": "webdataset"}
        epochs = max(1, math.ceil(args.steps / max(1, files["rows"] // args.batch)))
        run_file = common.kubetune_run_file(work / f"run-{tag}.yaml", args.model, data, args.steps, epochs,
                                            args.batch, args.workers)
        measured = common.run_measured(common.kubetune_cmd(run_file, out_dir, args.threads), env,
                                       work / "logs" / f"{tag}.log", {})
        progress = common.kubetune_progress(text for _, text in measured.lines)
        common.remove_tree(out_dir)
        if measured.rc != 0 or not progress:
            return _failed(measured, "trainer")
        rates = common.kubetune_step_rates(progress, args.batch, args.warmup)
        first = common.first_step_seconds(progress, measured.started)
        steps = progress[-1][0]
    else:
        logs = work / f"oc-logs-{tag}"
        if side == "open_clip-csv":
            source = ["--train-data", str(files["oc_csv"]), "--dataset-type", "csv", "--csv-img-key", "filepath",
                      "--csv-caption-key", "title", "--csv-separator", "\t"]
        else:
            source = ["--train-data", files["shard_pattern"], "--dataset-type", "webdataset", "--dataset-resampled",
                      "--train-num-samples", str(args.steps * args.batch)]
        cmd = common.open_clip_cmd(files["model_dir"], logs, source, args.batch, args.workers, args.threads)
        measured = common.run_measured(cmd, env, work / "logs" / f"{tag}.log", {})
        parsed = common.open_clip_steps(text for _, text in measured.lines)
        common.remove_tree(logs)
        if measured.rc != 0 or not parsed:
            return _failed(measured, "open_clip_train")
        rates = common.open_clip_step_rates(parsed, args.warmup)
        first = next(t for t, text in measured.lines if common.OPEN_CLIP_STEP.search(text)) - measured.started
        steps = len(parsed)
    return {"status": "ok", "steady_samples_per_s": common.median_or_none(rates), "steps": steps,
            "steps_timed": len(rates), "step_rates": [round(r, 2) for r in rates], "first_step_s": first,
            "wall_s": round(measured.wall_s, 2), "tree_peak_pss_bytes": measured.peaks.tree_pss}


def _failed(measured: common.Measured, what: str) -> dict[str, Any]:
    return {"status": f"unavailable: {what} exit {measured.rc}: {common.failure_reason(measured.lines)}",
            "wall_s": round(measured.wall_s, 2)}


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = args.steps * args.batch
    images = math.ceil(rows / args.captions)
    rows = images * args.captions
    image_dir = common.generate_images(args.data_dir, images)

    def local(i: int) -> str:
        return str(image_dir / common.image_name(i))

    pairs = common.pair_rows(images, local, args.captions)
    kt_csv = common.write_csv(args.data_dir / "csv" / f"local-{images}x{args.captions}.csv", pairs)
    oc_csv = common.write_csv(work / "open_clip.tsv", ((uri, text) for text, uri in pairs),
                              columns=("filepath", "title"), delimiter="\t")
    # at least two shards per loader worker, so no worker of either loader waits on a single shard
    shard_size = args.shard_size or max(1, math.ceil(images / (2 * args.workers)))
    shards = args.data_dir / "shards" / f"images-{images}x{args.captions}-per-{shard_size}"
    written_by = common.make_shards(shards, kt_csv, image_dir, images, shard_size, args.captions)
    count = len(list(shards.glob("shard-*.tar")))
    return {"rows": rows, "images": images, "kt_csv": kt_csv, "oc_csv": oc_csv, "shards": shards,
            "shard_size": shard_size, "shards_written_by": written_by,
            "shard_pattern": str(shards / f"shard-{{000000..{count - 1:06d}}}.tar"),
            "model_dir": common.open_clip_model_dir(work, args.model)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer_vs_open_clip", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, interleaved")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady samples/s")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers (every side)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads and taskset CPUs (every side)")
    parser.add_argument("--model", choices=sorted(common.MODELS), default="tiny")
    parser.add_argument("--captions", type=int, default=common.CAPTIONS_PER_IMAGE, help="captions per image")
    parser.add_argument("--shard-size", type=int, default=0, help="images per shard (0: two shards per worker)")
    parser.add_argument("--kubetune-check-rows", type=int, default=None,
                        help="kubetune-csv's data.checkRowsUpTo (default: the spec's; 0 reads the CSV lazily)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR, help="generated data, reused")
    parser.add_argument("--json", type=Path, default=None, help=f"results (default {DEFAULT_JSON}; smoke: none)")
    parser.add_argument("--smoke", action="store_true", help="8 steps of 16, 1 repeat: checks the bench")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.steps, args.warmup, args.batch = 1, 8, 2, 16
    elif args.json is None:
        args.json = DEFAULT_JSON
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="kt-vs-oc-") as tmp:
        work = Path(tmp)
        files = prepare(args, work)
        for repeat in range(args.repeats):
            shift = repeat % len(args.sides)
            for side in args.sides[shift:] + args.sides[:shift]:  # interleaved: load hits every side alike
                record = run_side(side, files, args, work, f"{side}-{repeat}")
                record.update(side=side, repeat=repeat)
                raw[side].append(record)
                print(common.json_line({k: v for k, v in record.items() if k != "step_rates"}), flush=True)
    memory_budget: int | None
    try:
        from kubetune_trainer.data import DEFAULT_CACHE_BYTES as memory_budget
    except ImportError:  # the trainer keeps no decoded images in memory any more
        memory_budget = None
    summary = {side: summarize_side(runs) for side, runs in raw.items()}
    result: dict[str, Any] = {
        "bench": "trainer_vs_open_clip", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": args.smoke,
        "settings": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "workers": args.workers,
                     "threads": args.threads, "model": args.model, "repeats": args.repeats,
                     "rows": files["rows"], "images": files["images"], "captions": args.captions,
                     "shard_size": files["shard_size"], "shards_written_by": files["shards_written_by"],
                     "kubetune_check_rows": args.kubetune_check_rows, "image_px": 224},
        "differences": differences(args, files["rows"], files["images"], memory_budget),
        "machine": common.machine(load_before), "versions": common.versions(),
        "summary": summary, "ratios": ratios(summary), "raw": raw,
    }
    if args.smoke:
        print("smoke: 6 timed steps of 16 per side say nothing about the trainers; they show the bench works")
    for side, figures in summary.items():
        rate = figures.get("steady_samples_per_s")
        print(f"{side:<22} " + (f"{rate['median']:.1f} samples/s (min {rate['min']:.1f}, max {rate['max']:.1f}, "
                                 f"{rate['n']} runs)" if rate else figures.get("unavailable", "no figure")))
    for name, value in result["ratios"].items():
        print(f"{name:<46} {'-' if value is None else value}")
    if args.json:
        common.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
