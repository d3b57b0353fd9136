"""Side by side: kubetune's trainer vs ``python -m open_clip_train.main`` on the same data and model.

Same tiny/small model config, same synthetic CSV data (one CSV per tool's column names), same batch size,
fp32 on CPU, the same number of data-loading workers and torch threads (OMP/MKL env + taskset when present).
Each tool runs E1 and E2 epochs; the per-epoch time is (T(E2) − T(E1)) / (E2 − E1), which cancels start-up
(imports, model creation, data validation), so samples/s = pairs per epoch / per-epoch time.

    .venv/bin/python bench/trainer_vs_open_clip.py [--n 1024] [--batch 64] [--threads 2] [--workers 2]

Prints one JSON object with both throughputs and the ratio kubetune ÷ open_clip (target ≥ 1.10).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "small": {"embed_dim": 128,
              "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}},
}


def prepare(work: Path, n: int, size: int, model: str) -> dict[str, Path]:
    from kubetune_trainer.synthetic import generate

    paths = generate(work / "data", n=n, eval_n=8, size=size, seed=0)
    oc_csv = work / "open_clip.csv"
    with paths["train"].open() as src, oc_csv.open("w", newline="") as dst:
        writer = csv.writer(dst, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for row in csv.DictReader(src):
            writer.writerow([str((paths["train"].parent / row["image"]).resolve()), row["text"]])
    model_dir = work / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODELS[model]}))
    return {"kt_csv": paths["train"], "oc_csv": oc_csv, "model_dir": model_dir}


def env_for(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "KUBETUNE_PROGRESS_SECONDS": "1000", "PYTHONWARNINGS": "ignore"}


def pin(threads: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= threads:
        return ["taskset", "-c", f"0-{threads - 1}"]
    return []


def run_open_clip(work: Path, files: dict[str, Path], epochs: int, args: argparse.Namespace) -> float:
    logs = work / f"oc-logs-{epochs}-{time.time_ns()}"
    cmd = [*pin(args.threads), sys.executable, "-m", "open_clip_train.main", "--model",
           f"local-dir:{files['model_dir']}", "--train-data", str(files["oc_csv"]), "--dataset-type", "csv",
           "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(args.batch),
           "--epochs", str(epochs), "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu",
           "--lr", "5e-4", "--warmup", "2", "--wd", "0.2", "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--log-every-n-steps", "1000", "--seed", "0", "--logs", str(logs),
           "--name", "bench"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env_for(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_kubetune(work: Path, files: dict[str, Path], epochs: int, args: argparse.Namespace) -> float:
    spec = {"model": {"name": "kt-bench", "config": MODELS[args.model]},
            "data": {"train": str(files["kt_csv"])},
            "training": {"epochs": epochs, "batchSize": args.batch, "learningRate": 5e-4, "warmupSteps": 2,
                         "weightDecay": 0.2, "precision": "fp32", "numWorkers": args.workers, "seed": 0},
            "callbacks": {"evaluation": {"enabled": False}},
            "runPolicy": {"checkpointEveryEpochs": 0}, "resources": {"gpus": 0}}
    config = work / f"kt-{epochs}.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = work / f"kt-out-{epochs}-{time.time_ns()}"
    cmd = [*pin(args.threads), sys.executable, "-m", "kubetune_trainer", "--config", str(config),
           "--output-dir", str(out)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env_for(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--n", type=int, default=1024, help="training pairs")
    parser.add_argument("--size", type=int, default=64, help="image side of the generated PNGs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs=2, default=(1, 4), metavar=("E1", "E2"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp:
        work = Path(tmp)
        files = prepare(work, args.n, args.size, args.model)
        e1, e2 = args.epochs
        times: dict[str, dict[int, float]] = {"open_clip": {}, "kubetune": {}}
        # interleaved, so that background load hits both tools alike
        for epochs in (e1, e2):
            times["open_clip"][epochs] = run_open_clip(work, files, epochs, args)
            times["kubetune"][epochs] = run_kubetune(work, files, epochs, args)
    pairs_per_epoch = (args.n // args.batch) * args.batch
    result: dict[str, Any] = {"model": args.model, "n": args.n, "batch": args.batch, "threads": args.threads,
                              "workers": args.workers, "epochs": [e1, e2], "wall_seconds": times}
    for tool, t in times.items():
        per_epoch = (t[e2] - t[e1]) / (e2 - e1)
        result[f"{tool}_seconds_per_epoch"] = round(per_epoch, 3)
        result[f"{tool}_samples_per_second"] = round(pairs_per_epoch / per_epoch, 1)
    result["ratio"] = round(result["kubetune_samples_per_second"] / result["open_clip_samples_per_second"], 3)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
