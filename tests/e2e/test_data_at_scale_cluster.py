"""Real-shaped data on the cluster: five captions per 224 px JPEG in the real S3 server, read by the real trainer
image in a Job with two loader workers, once streamed from WebDataset shards (written by `kubetune data shard`)
and once as a CSV read lazily, side by side."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
from kubetune.sdk.datatools import write_shards
from kubetune.storage import s3_store
from PIL import Image, ImageDraw

from tests.cluster.s3 import S3Server
from tests.integration.test_operator_support import OperatorProcess, Runs, run_manifest

pytestmark = pytest.mark.e2e

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
IMAGES, CAPTIONS = 64, 5
SHAPES = ("circle", "square", "bar", "cross")


def write_captioned_set(root: Path, images: int, seed: int) -> Path:
    """``images`` 224 px JPEGs of a coloured shape, each with five differently worded captions, as a CSV."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(images):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        shape = SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (224, 224), (rng.randrange(40), rng.randrange(40), rng.randrange(40)))
        draw = ImageDraw.Draw(image)
        x, y = rng.randrange(20, 100), rng.randrange(20, 100)
        box = (x, y, x + rng.randrange(60, 110), y + rng.randrange(60, 110))
        {"circle": draw.ellipse, "square": draw.rectangle, "bar": draw.rectangle, "cross": draw.line}[shape](
            box, fill=colour, **({"width": 20} if shape == "cross" else {}))
        image.save(root / "img" / f"{i:04d}.jpg", quality=90)
        for j in range(CAPTIONS):
            rows.append((f"photo {j} of a {shape} in rgb {colour[0] // 64} {colour[1] // 64} {colour[2] // 64}",
                         f"img/{i:04d}.jpg"))
    path = root / "pairs.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "image"])
        writer.writerows(rows)
    return path


@pytest.fixture
def captioned_in_s3(tmp_path: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
                    ) -> dict[str, str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    train = write_captioned_set(tmp_path / "train", IMAGES, seed=1)
    held_out = write_captioned_set(tmp_path / "eval", 16, seed=2)
    s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/sets").put_dir("train", train.parent)
    s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/sets").put_dir("eval", held_out.parent)
    shards = write_shards(f"s3://{s3_bucket}/sets/train/pairs.csv", f"s3://{s3_bucket}/shards/", shard_size=16,
                          endpoint=s3_server.host_endpoint)
    assert (len(shards.shards), shards.pairs) == (IMAGES // 16, IMAGES * CAPTIONS), shards
    return {"csv": f"s3://{s3_bucket}/sets/train/pairs.csv", "shards": f"s3://{s3_bucket}/shards/",
            "eval": f"s3://{s3_bucket}/sets/eval/pairs.csv"}


def _events(runs: Runs, name: str) -> list[dict[str, Any]]:
    pods = runs.core.list_namespaced_pod(runs.namespace, label_selector=f"kubetune.io/run={name}").items
    log = "".join(runs.core.read_namespaced_pod_log(p.metadata.name, runs.namespace, container="trainer")
                  for p in pods)
    return [json.loads(line.split("KUBETUNE_EVENT ", 1)[1]) for line in log.splitlines() if "KUBETUNE_EVENT " in line]


def test_streamed_shards_and_a_lazily_read_csv_train_from_s3_in_pods(
        kube_api: Any, namespace: str, trainer_operator: OperatorProcess, captioned_in_s3: dict[str, str]) -> None:
    runs = Runs(kube_api, namespace)
    batch, epochs = 32, 2
    for name, train, data in (("streamed", captioned_in_s3["shards"], {"cacheSize": "64Mi"}),
                              ("lazy-csv", captioned_in_s3["csv"], {"checkRowsUpTo": 0, "cacheSize": "64Mi"})):
        runs.create(run_manifest(
            name, model={"name": "kt-tiny-e2e", "config": TINY_CONFIG},
            data={"train": train, "eval": captioned_in_s3["eval"], **data},
            training={"epochs": epochs, "batchSize": batch, "learningRate": 1e-3, "numWorkers": 2, "warmupSteps": 2,
                      "seed": 7},
            callbacks={"evaluation": {"limit": 10}},
            resources={"gpus": 0, "cpu": "1", "memory": "3Gi", "ephemeralStorage": "1Gi"}))
    finals = {name: runs.wait_phase(name, "Succeeded", timeout=480) for name in ("streamed", "lazy-csv")}

    pairs = IMAGES * CAPTIONS
    for name, final in finals.items():
        events = _events(runs, name)
        started = next(e for e in events if e["type"] == "started")
        assert started["train_pairs"] == pairs, (name, started)
        # every rank trains full batches: the streamed set's 4 shards of 80 pairs give 2 workers 5 batches each
        assert final["progress"]["totalSteps"] == epochs * (pairs // batch), (name, final["progress"])
        losses = [e["loss"] for e in events if e["type"] == "progress"]
        assert losses[-1] < losses[0], (name, losses)
        assert final["metrics"]["before"] and final["metrics"]["after"], (name, final["metrics"])
        assert not final["progress"].get("skippedRows"), (name, final["progress"])
