"""Loading pairs: CSV with relative paths, DocList protobuf (never pickle), bad rows, val split, config files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from docarray import BaseDoc, DocList
from docarray.typing import ImageBytes, ImageUrl, NdArray
from kt_trainer_helpers import HttpFiles, tiny_spec, write_run
from kubetune.api.spec import DataSpec
from kubetune.storage import RetryPolicy
from kubetune_trainer.config import ConfigError, load_run_file
from kubetune_trainer.data import DataError, Fetcher, FetchUnavailable, load_datasets, load_set, split
from PIL import Image

pytestmark = pytest.mark.unit


class CaptionedImage(BaseDoc):
    caption: str
    image_url: ImageUrl | None = None
    image_bytes: ImageBytes | None = None
    tensor: NdArray | None = None


def _png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png((40 * i, 0, 0)))
    (tmp_path / "img" / "text.png").write_text("not an image")
    (tmp_path / "img" / "truncated.png").write_bytes(_png((1, 2, 3), 64)[:60])
    return tmp_path


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,image") -> Path:
    path.write_text(header + "\n" + "\n".join(f"{t},{i}" for t, i in rows) + "\n")
    return path


def test_csv_relative_paths_resolve_against_the_csv(folder: Path) -> None:
    csv_path = _csv(folder / "train.csv", [(f"caption {i}", f"img/{i}.png") for i in range(6)])
    pairs = load_set("train", str(csv_path), DataSpec(train=str(csv_path)), Fetcher(folder / "cache"))
    assert len(pairs) == 6 and pairs.skipped == 0
    assert pairs.pairs[2].image.key == str(folder / "img" / "2.png") and pairs.pairs[2].row == 3
    assert pairs.pairs[2].image.open().getpixel((0, 0)) == (80, 0, 0)


@pytest.mark.parametrize(("image", "reason"), [
    ("img/absent.png", "not found"),
    ("img/text.png", "unreadable"),
    ("img/truncated.png", "unreadable"),
    ("", "no image"),
])
def test_a_bad_row_names_set_row_and_reason(folder: Path, image: str, reason: str) -> None:
    rows = [(f"caption {i}", f"img/{i}.png") for i in range(4)]
    rows.insert(2, ("broken", image))
    csv_path = _csv(folder / "eval.csv", rows)
    with pytest.raises(DataError) as info:
        load_set("eval", str(csv_path), DataSpec(train="x.csv"), Fetcher(folder / "cache"))
    assert info.value.set_name == "eval" and info.value.row == 3
    assert str(info.value).startswith("eval set, row 3: ") and reason in str(info.value)


def test_skip_bad_rows_skips_and_counts(folder: Path) -> None:
    rows = [("a", "img/0.png"), ("b", "img/absent.png"), ("c", "img/text.png"), (" ", "img/1.png"),
            ("d", "img/2.png")]
    csv_path = _csv(folder / "train.csv", rows)
    pairs = load_set("train", str(csv_path), DataSpec(train="x.csv", skip_bad_rows=True), Fetcher(folder / "c"))
    assert [p.text for p in pairs.pairs] == ["a", "d"] and pairs.skipped == 3
    assert pairs.skip_reasons[0].startswith("row 2: image") and "empty text" in pairs.skip_reasons[2]


def test_missing_column_and_missing_file(folder: Path) -> None:
    csv_path = _csv(folder / "train.csv", [("a", "img/0.png")], header="caption,path")
    with pytest.raises(DataError, match="no column 'text'"):
        load_set("train", str(csv_path), DataSpec(train="x.csv"), Fetcher(folder / "c"))
    with pytest.raises(DataError, match="does not exist"):
        load_set("train", str(folder / "nope.csv"), DataSpec(train="x.csv"), Fetcher(folder / "c"))


@pytest.mark.parametrize("compress", [None, "lz4", "gzip"])
@pytest.mark.parametrize("protocol", ["protobuf", "protobuf-array"])
def test_doclist_protobuf_with_urls_bytes_and_tensors(folder: Path, protocol: str, compress: str | None) -> None:
    docs = DocList[CaptionedImage]([
        CaptionedImage(caption="by url", image_url="img/1.png"),
        CaptionedImage(caption="by bytes", image_bytes=_png((0, 255, 0))),
        CaptionedImage(caption="by tensor", tensor=np.full((8, 8, 3), 200, dtype=np.uint8)),
    ])
    path = folder / "pairs.bin"
    path.write_bytes(docs.to_bytes(protocol=protocol, compress=compress))
    spec = DataSpec(train=str(path), text_column="caption", image_column="image_url")
    pairs = load_set("train", str(path), spec, Fetcher(folder / "c"))
    assert [p.text for p in pairs.pairs] == ["by url", "by bytes", "by tensor"]
    assert pairs.pairs[0].image.key == str(folder / "img" / "1.png")
    assert pairs.pairs[1].image.key.startswith("sha256:")
    assert pairs.pairs[1].image.open().getpixel((3, 3)) == (0, 255, 0)
    assert pairs.pairs[2].image.open().getpixel((3, 3)) == (200, 200, 200)


def test_a_pickled_doclist_is_refused(folder: Path) -> None:
    docs = DocList[CaptionedImage]([CaptionedImage(caption="x", image_bytes=_png((1, 1, 1)))])
    path = folder / "pairs.bin"
    path.write_bytes(docs.to_bytes(protocol="pickle"))
    with pytest.raises(DataError, match="neither a CSV nor a protobuf-serialised DocList"):
        load_set("train", str(path), DataSpec(train=str(path)), Fetcher(folder / "c"))


def test_val_split_is_deterministic_and_disjoint(folder: Path) -> None:
    csv_path = _csv(folder / "train.csv", [(f"caption {i}", f"img/{i % 6}.png") for i in range(40)])
    spec = DataSpec(train=str(csv_path), val_split=0.25)
    first = load_datasets(spec, Fetcher(folder / "c"), seed=3)
    second = load_datasets(spec, Fetcher(folder / "c"), seed=3)
    assert first.val is not None and second.val is not None
    assert len(first.val) == 10 and len(first.train) == 30
    assert [p.row for p in first.val.pairs] == [p.row for p in second.val.pairs]
    assert not {p.row for p in first.val.pairs} & {p.row for p in first.train.pairs}
    assert first.query is first.val and first.index is first.val
    with pytest.raises(DataError, match="leaves no training pairs"):
        split(load_set("t", str(_csv(folder / "one.csv", [("a", "img/0.png")])), spec, Fetcher(folder / "c")),
              0.5, 0)


def test_run_file_forms(tmp_path: Path) -> None:
    spec = tiny_spec("train.csv")
    run, bare = tmp_path / "run.yaml", tmp_path / "spec.json"
    write_run(run, spec, name="shapes", namespace="ml", uid="u-1")
    bare.write_text(json.dumps(spec))
    parsed = load_run_file(run)
    assert (parsed.name, parsed.namespace, parsed.uid, parsed.spec.training.batch_size) == ("shapes", "ml", "u-1", 32)
    parsed_bare = load_run_file(bare)
    assert parsed_bare.spec == parsed.spec and parsed_bare.name is None and parsed_bare.uid is None
    for doc, error in (({"kind": "Pod", "spec": spec}, "kind FinetuneRun; got .*'Pod'"),
                       ({**spec, "training": {"batchSize": 1}}, r"spec\.training\.batchSize"),
                       ({**spec, "data": {"train": "a.csv", "eval": "b.csv", "valSplit": 0.1}}, "spec.data.valSplit")):
        (tmp_path / "bad.yaml").write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match=error):
            load_run_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("spec: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_file(tmp_path / "broken.yaml")


def test_image_references_resolve_against_remote_csvs() -> None:
    from kubetune_trainer.data import resolve_uri

    assert resolve_uri("images/a.png", "s3://b/data/train.csv") == "s3://b/data/images/a.png"
    assert resolve_uri("../img/a.png", "s3://b/data/sub/train.csv") == "s3://b/data/img/a.png"
    assert resolve_uri("a.png", "https://host/d/train.csv") == "https://host/d/a.png"
    assert resolve_uri("s3://other/x.png", "s3://b/train.csv") == "s3://other/x.png"


def test_http_data_read_retries_a_server_that_is_unavailable_then_gives_up(
        http_files: HttpFiles, tmp_path: Path) -> None:
    png = _png((200, 10, 10))
    http_files.bodies.update({"/img.png": png, "/other.png": png})
    http_files.fail_first = 2  # each path answers 503 twice, then its bytes
    base = http_files.base
    slept: list[float] = []
    fetcher = Fetcher(tmp_path, retry=RetryPolicy.for_window(10, sleep=slept.append))
    assert fetcher.read(f"{base}/img.png") == png  # 503, 503, then the bytes
    assert http_files.gets["/img.png"] == 3 and slept == [0.5, 1.0]
    with pytest.raises(FileNotFoundError):  # a missing file is no outage: asked once
        fetcher.read(f"{base}/missing.png")
    assert http_files.gets["/missing.png"] == 1
    no_retry = Fetcher(tmp_path, retry=RetryPolicy.for_window(0))
    with pytest.raises(FetchUnavailable, match=r"HTTP 503 \(unreachable after 1 try\)"):
        no_retry.read(f"{base}/other.png")
    assert http_files.gets["/other.png"] == 1
