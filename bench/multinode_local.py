"""Two "pods" against one on the same machine: the trainer's own launcher, as the operator starts it.

    python -m bench.multinode_local --repeats 3 --json bench/results/multinode-local.json

Side ``one-pod``: one launcher with ``procsPerNode: 2`` (one pod, two processes). Side ``two-pods``: two launchers
with ``nodes: 2`` and one process each, ``KUBETUNE_NODE_RANK`` 0 and 1 and rank 0's rendezvous on the loopback,
as two pods of a run over several pods get them. Both: the same tiny model, the same 224 px JPEG data (five
captions per image, local files), the same global batch (2 × per-rank batch), seed and one CPU thread per
process. What differs is only how the two processes meet: under one torchrun (its own store, shared-memory
free, same process tree) or under two torchruns joined by the static rendezvous on a TCPStore, as across pods.
The network between real pods (a bridge, or a real NIC between nodes) is not measured here; the harness e2e
test (tests/e2e/test_operator_multinode.py) prints one such figure.

Per repeat and side: seconds from launch to the trainer's ``started`` event (torchrun up, rendezvous and process
group done, data opened), the median samples/s over steps after the first 5, and the wall time. Sides alternate;
the machine's load is recorded before each repeat.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

ROOT = common.ROOT
BATCH = 16  # per process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_file(path: Path, train_csv: Path, steps: int, resources: dict[str, Any]) -> Path:
    import yaml

    common.kubetune_run_file(path, "tiny", {"train": str(train_csv)}, steps=steps, epochs=100, batch=BATCH, workers=0)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["resources"] = {"gpus": 0, **resources}
    path.write_text(yaml.safe_dump(doc))
    return path


def _launch(run_file: Path, out: Path, extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {**common.env_for(1), "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer-image")]),
           **extra}
    return subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "--config", str(run_file), "--output-dir",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def one_side(side: str, work: Path, train_csv: Path, steps: int) -> dict[str, Any]:
    from kubetune.api.events import parse_line

    root = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
    started = time.time()
    if side == "one-pod":
        procs = [_launch(_run_file(root / "run.yaml", train_csv, steps, {"procsPerNode": 2}), root / "out", {})]
    else:
        port = _free_port()
        run_file = _run_file(root / "run.yaml", train_csv, steps, {"nodes": 2, "procsPerNode": 1})
        procs = [_launch(run_file, root / f"out-{rank}", {"KUBETUNE_NODE_RANK": str(rank),
                                                          "KUBETUNE_RENDEZVOUS": f"127.0.0.1:{port}"})
                 for rank in (0, 1)]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    wall = time.time() - started
    lines = outputs[0].splitlines()
    events = [e for e in (parse_line(line) for line in lines) if e is not None]
    started_event = next((e for e in events if e.type == "started"), None)
    rates = common.kubetune_step_rates(common.kubetune_progress(lines), samples_per_step=2 * BATCH, warmup=5)
    common.remove_tree(root)
    return {"side": side, "rc": [p.returncode for p in procs], "wall_s": round(wall, 2),
            "to_started_s": round(started_event.time - started, 2) if started_event else None,
            "samples_per_s": common.median_or_none(rates), "steps_timed": len(rates)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cache = Path(os.environ.get("KUBETUNE_BENCH_CACHE", Path(tempfile.gettempdir()) / "kubetune-bench"))
    images = common.generate_images(cache / "images", args.images)
    with tempfile.TemporaryDirectory(prefix="kt-multinode-") as tmp:
        work = Path(tmp)
        train_csv = common.write_csv(work / "train.csv", common.pair_rows(
            args.images, lambda i: str(images / common.image_name(i))))
        records: list[dict[str, Any]] = []
        sides = ["one-pod", "two-pods"]
        for repeat in range(args.repeats):
            for side in sides[repeat % 2:] + sides[:repeat % 2]:  # alternate which side goes first
                load = os.getloadavg()
                record = {"repeat": repeat, **one_side(side, work, train_csv, args.steps),
                          "loadavg_before": [round(x, 2) for x in load]}
                records.append(record)
                print(common.json_line(record), flush=True)
    summary = {side: {name: common.summarize([r[name] for r in records if r["side"] == side])
                      for name in ("to_started_s", "samples_per_s", "wall_s")} for side in sides}
    payload = {"bench": "multinode_local", "args": {k: str(v) for k, v in vars(args).items()},
               "batch_per_process": BATCH, "machine": common.machine(), "versions": common.versions(),
               "summary": summary, "records": records}
    print(common.json_line(summary))
    if args.json:
        common.write_json(args.json, payload)
    return 0 if all(set(r["rc"]) == {0} for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
