"""`kubetune data validate` and `kubetune data shard` on real image bytes (224 px JPEGs with several captions each,
a PNG, a truncated JPEG, a missing file, a copy of an image under another name): the counts and row numbers, the
exit codes, the shard layout of the data contract read back with `tarfile`, byte-identical shards on a second
run, shards on a real S3 server; and fit/submit refusing a broken local set before anything is uploaded."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubetune
import pytest
import yaml
from kubetune.api import errors
from kubetune.sdk import datatools
from kubetune.sdk.cli import app
from kubetune.sdk.client import Client
from kubetune.sdk.datatools import ImageCheck, ShardInfo, SourceRow
from kubetune.storage import LocalStore, s3_store
from PIL import Image
from typer.testing import CliRunner

from tests.unit.conftest import FakeRuns

pytestmark = pytest.mark.unit
runner = CliRunner()
LONG = "a red square " + "with a thin white border and a soft shadow " * 12  # > 77 CLIP tokens
# (caption, image) rows of the clean set; red-copy.jpg holds red.jpg's bytes (a duplicate: a warning only)
CLEAN = [("a red square", "red.jpg"), ("a crimson square", "red.jpg"), ("a scarlet tile", "red.jpg"),
         ("a blue square", "blue.jpg"), ("a navy square", "blue.jpg"), ("a green circle", "green.png"),
         ("the red square again", "red-copy.jpg"), (LONG, "green.png")]
# the broken set: the clean rows with three broken ones among them (rows 4, 7 and 9)
BROKEN = [*CLEAN[:3], ("", "blue.jpg"), *CLEAN[3:5], ("a torn photo", "torn.jpg"), CLEAN[5],
          ("a lost photo", "gone.jpg"), *CLEAN[6:]]


def picture(colour: tuple[int, int, int], fmt: str) -> bytes:
    image = Image.new("RGB", (224, 224), colour)
    for i in range(224):  # a diagonal: something for the encoder to keep
        image.putpixel((i, i), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format=fmt, quality=90)
    return out.getvalue()


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "image"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("set")
    (root / "red.jpg").write_bytes(picture((200, 30, 30), "JPEG"))
    (root / "red-copy.jpg").write_bytes((root / "red.jpg").read_bytes())
    (root / "blue.jpg").write_bytes(picture((30, 30, 200), "JPEG"))
    (root / "green.png").write_bytes(picture((30, 180, 30), "PNG"))
    whole = picture((120, 120, 120), "JPEG")
    (root / "torn.jpg").write_bytes(whole[: len(whole) // 2])
    return {"root": root, "clean": write_csv(root / "clean.csv", CLEAN),
            "broken": write_csv(root / "broken.csv", BROKEN)}


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def read_shards(directory: Path) -> dict[str, list[tuple[str, bytes]]]:
    shards = {}
    for path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    return shards


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------------------ pure
def test_summary_counts_broken_rows_by_row_and_duplicates_and_sizes_by_image() -> None:
    rows = [SourceRow(1, "a cat", "s3://b/cat.jpg"), SourceRow(2, "a kitten", "s3://b/cat.jpg"),
            SourceRow(3, "  ", "s3://b/dog.jpg"), SourceRow(4, "a dog", "s3://b/dog.jpg"),
            SourceRow(5, "a fish", "s3://b/fish.jpg"), SourceRow(6, "a bird", None),
            SourceRow(7, "a cat again", "s3://b/cat-copy.jpg"), SourceRow(8, "a cow", "s3://b/cow.jpg")]
    checks = {"s3://b/cat.jpg": ImageCheck("s3://b/cat.jpg", sha256="c", width=300, height=200, format="JPEG"),
              "s3://b/dog.jpg": ImageCheck("s3://b/dog.jpg", sha256="d", width=10, height=10, format="PNG"),
              "s3://b/fish.jpg": ImageCheck("s3://b/fish.jpg", "missing"),
              "s3://b/cat-copy.jpg": ImageCheck("s3://b/cat-copy.jpg", sha256="c", width=300, height=200),
              "s3://b/cow.jpg": ImageCheck("s3://b/cow.jpg", "unreadable", "OSError: image file is truncated")}
    report = datatools.summarise("set.csv", rows, checks, token_counts=[4, 5, 80, 4, 4, 6, 5])
    assert (report.rows, report.images, report.broken_rows) == (8, 5, 4)
    assert (report.missing_images, report.unreadable_images, report.empty_captions) == (2, 1, 1)
    assert [(p.row, p.reason) for p in report.problems] == [
        (3, "empty caption"), (5, "image s3://b/fish.jpg not found"), (6, "no image"),
        (8, "image s3://b/cow.jpg is unreadable (OSError: image file is truncated)")]
    assert report.duplicate_images == 1 and "s3://b/cat-copy.jpg = s3://b/cat.jpg" in report.warnings[0]
    assert report.long_captions == 1 and "77" in report.warnings[1]
    assert report.captions_per_image == datatools.Spread(1, 1, 2)
    assert report.image_sizes == {"min": (10, 10), "median": (300, 200), "max": (300, 200)}
    assert not report.ok and json.loads(json.dumps(report.to_dict()))["imageSizes"]["min"] == "10x10"


def test_samples_are_one_per_image_in_order_of_first_row_with_their_good_rows() -> None:
    rows = [SourceRow(1, "b1", "b.jpg"), SourceRow(2, "a1", "a.jpg"), SourceRow(3, "", "a.jpg"),
            SourceRow(4, "b2", "b.jpg"), SourceRow(5, "c1", None)]
    samples, problems = datatools.plan_samples(rows)
    assert [(s.image, s.captions, s.rows) for s in samples] == [("b.jpg", ("b1", "b2"), (1, 4)),
                                                                ("a.jpg", ("a1",), (2,))]
    assert [(p.row, p.reason) for p in problems] == [(3, "empty caption"), (5, "no image")]
    names = [name for name, _ in datatools.sample_members(41, b"jpeg", samples[0])]
    assert names == ["000000041.jpg", "000000041.txt", "000000041.json"]
    (_, sizes), (last, manifest) = datatools.manifests([ShardInfo("shard-000000.tar", 2, 3)], "s3://b/set.csv")
    assert json.loads(sizes) == {"shard-000000.tar": 2} and last == "kubetune-shards.json"
    assert json.loads(manifest) == {"version": 1, "shards": [{"name": "shard-000000.tar", "images": 2, "pairs": 3}],
                                    "images": 2, "pairs": 3, "source": "s3://b/set.csv"}


def test_images_are_fetched_ahead_by_at_most_the_window() -> None:
    lock, live, peak = threading.Lock(), [0], [0]

    def fetch(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return i

    with ThreadPoolExecutor(4) as pool:
        out = []
        for i in datatools.in_order(pool, fetch, range(200), window=5):
            with lock:
                live[0] -= 1  # consumed: its bytes are written and dropped
            out.append(i)
    assert out == list(range(200)) and peak[0] <= 5


# ------------------------------------------------------------------------------------------------ validate
def test_validate_names_the_broken_rows_and_exits_with_the_usage_code(sets: dict[str, Path]) -> None:
    out = invoke("data", "validate", str(sets["broken"]), "--no-tokens", "-o", "json")
    assert out.exit_code == errors.EXIT_USAGE
    report = json.loads(out.stdout)
    assert (report["rows"], report["images"], report["brokenRows"]) == (11, 6, 3)
    assert (report["missingImages"], report["unreadableImages"], report["emptyCaptions"]) == (1, 1, 1)
    assert report["duplicateImages"] == 1 and report["imageSizes"] == {"min": "224x224", "median": "224x224",
                                                                       "max": "224x224"}
    assert report["captionsPerImage"] == {"min": 1, "median": 1.5, "max": 3}
    assert [(p["row"], p["reason"].split(" (")[0]) for p in report["problems"]] == [
        (4, "empty caption"), (7, f"image {sets['root'] / 'torn.jpg'} is unreadable"),
        (9, f"image {sets['root'] / 'gone.jpg'} not found")]
    assert report["captionTokens"] is None and not report["ok"]
    assert out.stderr.splitlines()[0].startswith(f"error: {sets['broken']}: 3 broken row(s) of 11, first: row 4")

    table = invoke("data", "validate", str(sets["broken"]), "--no-tokens")
    assert table.exit_code == errors.EXIT_USAGE
    assert "first broken rows (3 of 3)" in table.stdout and "torn.jpg" in table.stdout
    assert "warning: 1 image(s) have the same bytes" in table.stdout


def test_validate_a_clean_set_exits_0_and_counts_clip_tokens(sets: dict[str, Path]) -> None:
    pytest.importorskip("open_clip")
    out = invoke("data", "validate", str(sets["clean"]), "-o", "json", "--workers", "3")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["ok"] and (report["rows"], report["images"], report["brokenRows"]) == (8, 4, 0)
    assert report["longCaptions"] == 1 and report["captionTokens"]["max"] > 77
    assert any("over 77 CLIP tokens" in w for w in report["warnings"])
    table = invoke("data", "validate", str(sets["clean"]), "--no-tokens")
    assert table.exit_code == 0 and "valid: 8 rows, 4 images" in table.stdout


def test_a_wrong_column_is_one_line_naming_the_columns_found(sets: dict[str, Path]) -> None:
    out = invoke("data", "validate", str(sets["clean"]), "--text-column", "caption")
    assert out.exit_code == errors.EXIT_USAGE
    assert out.stderr.splitlines() == [f"error: {sets['clean']}: no column 'caption' (columns: text, image)",
                                       "hint: name them with --text-column and --image-column"]


# ------------------------------------------------------------------------------------------------ shard
def test_shards_follow_the_contract_and_hold_every_pair_once(sets: dict[str, Path], tmp_path: Path) -> None:
    out = invoke("data", "shard", str(sets["clean"]), str(tmp_path / "a"), "--shard-size", "3")
    assert out.exit_code == 0, out.output
    assert f"data.train: {tmp_path / 'a'}/" in out.stdout
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "kubetune-shards.json", "shard-000000.tar", "shard-000001.tar", "sizes.json"]
    shards = read_shards(tmp_path / "a")
    assert [name for name, _ in shards["shard-000000.tar"]] == [
        f"00000000{i}.{ext}" for i in range(3) for ext in ("jpg", "txt", "json")]
    assert [name for name, _ in shards["shard-000001.tar"]] == ["000000003.jpg", "000000003.txt", "000000003.json"]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 1}
    assert json.loads((tmp_path / "a" / "kubetune-shards.json").read_text()) == {
        "version": 1, "shards": [{"name": "shard-000000.tar", "images": 3, "pairs": 7},
                                 {"name": "shard-000001.tar", "images": 1, "pairs": 1}],
        "images": 4, "pairs": 8, "source": str(sets["clean"])}

    found: Counter[tuple[str, str]] = Counter()
    for members in shards.values():
        files = dict(members)
        for name, data in members:
            if name.endswith(".json"):
                key = name.removesuffix(".json")
                meta, image = json.loads(data), files[f"{key}.jpg"]
                assert files[f"{key}.txt"].decode() == meta["captions"][0]
                assert [CLEAN[row - 1][0] for row in meta["rows"]] == meta["captions"]
                with Image.open(io.BytesIO(image)) as decoded:
                    assert decoded.format == "JPEG" and decoded.size == (224, 224)
                found.update((caption, hashlib.sha256(image).hexdigest()) for caption in meta["captions"])
    jpeg = {name: hashlib.sha256((sets["root"] / name).read_bytes()).hexdigest() for name in ("red.jpg", "blue.jpg",
                                                                                               "red-copy.jpg")}
    reencoded = {digest for _, digest in found} - set(jpeg.values())  # the PNG, as JPEG
    assert len(reencoded) == 1
    assert found == Counter((caption, jpeg.get(image) or next(iter(reencoded))) for caption, image in CLEAN)


def test_sharding_again_gives_the_same_bytes_and_drops_surplus_shards(sets: dict[str, Path], tmp_path: Path) -> None:
    datatools.write_shards(str(sets["clean"]), str(tmp_path / "a"), shard_size=1)  # 4 shards, replaced below
    first = datatools.write_shards(str(sets["clean"]), str(tmp_path / "a"), shard_size=3, workers=1)
    second = datatools.write_shards(str(sets["clean"]), str(tmp_path / "b"), shard_size=3, workers=4)
    assert (first.images, first.pairs, len(first.shards)) == (second.images, second.pairs, 2) == (4, 8, 2)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_a_broken_row_stops_sharding_unless_broken_rows_are_skipped(sets: dict[str, Path], tmp_path: Path) -> None:
    out = invoke("data", "shard", str(sets["broken"]), str(tmp_path / "x"))
    assert out.exit_code == errors.EXIT_USAGE
    assert out.stderr.startswith(f"error: {sets['broken']}, row 4: empty caption")
    assert not (tmp_path / "x" / "kubetune-shards.json").exists()

    out = invoke("data", "shard", str(sets["broken"]), str(tmp_path / "y"), "--skip-bad-rows", "-o", "json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert (result["images"], result["pairs"], result["skippedRows"]) == (4, 8, 3)
    assert [p["row"] for p in result["problems"]] == [4, 7, 9]
    manifest = json.loads((tmp_path / "y" / "kubetune-shards.json").read_text())
    assert (manifest["images"], manifest["pairs"]) == (4, 8)


def test_shards_go_to_a_real_s3_and_read_back_the_same(sets: dict[str, Path], s3_server: Any, s3_bucket: str,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "KUBETUNE_S3_ENDPOINT": s3_server.host_endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    source = s3_store(s3_server.host_endpoint, f"s3://{s3_bucket}/raw")
    for path in sorted(sets["root"].iterdir()):
        source.put_file(path.name, path)
    remote = f"s3://{s3_bucket}/raw/clean.csv"  # its images are relative to it: s3:// too
    report = datatools.validate_set(remote, tokens=False)
    assert report.ok and (report.rows, report.images, report.duplicate_images) == (8, 4, 1)

    result = datatools.write_shards(remote, f"s3://{s3_bucket}/shards/", shard_size=3)
    assert result.dest == f"s3://{s3_bucket}/shards/"
    shards = s3_store(s3_server.host_endpoint, result.dest)
    assert shards.list() == ["kubetune-shards.json", "shard-000000.tar", "shard-000001.tar", "sizes.json"]
    local = datatools.write_shards(str(sets["clean"]), str(tmp_path / "local"), shard_size=3)
    assert {k: shards.get_bytes(k) for k in ("shard-000000.tar", "shard-000001.tar", "sizes.json")} == {
        k: v for k, v in tree(tmp_path / "local").items() if k != "kubetune-shards.json"}
    assert json.loads(shards.get_bytes("kubetune-shards.json"))["source"] == remote
    assert local.pairs == result.pairs == 8


# ------------------------------------------------------------------------------------------------ fit / submit
def run_file(folder: Path, train: str, **data: Any) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
                                    "metadata": {"name": "shoes"},
                                    "spec": {"model": {"name": "ViT-B-32"}, "data": {"train": train, **data},
                                             "resources": {"gpus": 0}}}))
    return path


@pytest.mark.parametrize("how", ["fit", "submit"])
def test_fit_and_submit_refuse_a_broken_local_set_before_uploading_anything(
        how: str, sets: dict[str, Path], client: Client, api: FakeRuns, bucket: LocalStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    puts: list[str] = []
    put_file = bucket.put_file

    def recorded_put_file(key: str, path: Any) -> None:
        puts.append(key)
        put_file(key, path)

    monkeypatch.setattr(bucket, "put_file", recorded_put_file)
    with pytest.raises(errors.ConfigInvalid) as info:
        if how == "fit":
            kubetune.fit("ViT-B-32", train_data=str(sets["broken"]), run_name="shoes", client=client, gpus=0)
        else:
            client.submit(run_file(sets["root"], "broken.csv"))
    assert "3 broken row(s) of 11: row 4: empty caption; row 7: image" in info.value.message
    assert "validate=False" in (info.value.hint or "")
    assert puts == [] and ("create", "shoes") not in api.calls


def test_an_unchecked_or_skipping_run_uploads_a_set_with_broken_rows(sets: dict[str, Path], client: Client,
                                                                     api: FakeRuns, bucket: LocalStore,
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "torn"
    folder.mkdir()
    (folder / "torn.jpg").write_bytes((sets["root"] / "torn.jpg").read_bytes())
    write_csv(folder / "train.csv", [("a torn photo", "torn.jpg")])
    run = kubetune.fit("ViT-B-32", train_data=str(folder / "train.csv"), run_name="shoes", client=client, gpus=0,
                       validate=False)
    assert run.spec.data.train.endswith("/train/train.csv") and len(bucket.list()) == 2
    skipping = client.submit(run_file(folder, "train.csv", skipBadRows=True), name="boots")  # the run skips it
    assert ("create", "boots") in api.calls and skipping.spec.data.skip_bad_rows


def test_cli_submit_refuses_a_broken_local_set_with_the_usage_code_unless_told_not_to_check(
        sets: dict[str, Path], client: Client, api: FakeRuns, bucket: LocalStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.sdk import cli

    monkeypatch.setattr(cli, "_client", lambda namespace, kubeconfig, context: client)
    folder = tmp_path / "torn"
    folder.mkdir()
    (folder / "torn.jpg").write_bytes((sets["root"] / "torn.jpg").read_bytes())
    write_csv(folder / "train.csv", [("a torn photo", "torn.jpg")])
    out = invoke("submit", str(run_file(folder, "train.csv")))
    assert out.exit_code == errors.EXIT_USAGE and bucket.list() == []
    assert out.stderr.startswith(f"error: spec.data.train {folder / 'train.csv'}: 1 broken row(s) of 1: row 1: image")
    out = invoke("submit", str(run_file(folder, "train.csv")), "--no-validate", "-o", "name")
    assert out.exit_code == 0 and out.stdout == "finetunerun.kubetune.io/shoes\n"
    assert ("create", "shoes") in api.calls and len(bucket.list()) == 2
