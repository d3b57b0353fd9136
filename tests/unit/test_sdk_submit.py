"""fit/submit with local data against a fake Kubernetes API and a local bucket: every submission uploads under a
prefix of its own, an invalid or taken name uploads nothing, and a create that fails takes its uploads back, so
a name collision never touches another run's data."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubetune
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubetune.api import errors
from kubetune.sdk.client import Client, build_spec, new_upload_id
from kubetune.storage import LocalStore, StoreError, StoreUnavailable
from PIL import Image

from tests.unit.conftest import FakeRuns

pytestmark = pytest.mark.unit
UPLOAD_ID = r"\d{8}T\d{6}Z-[0-9a-f]{8}"






def dataset(tmp_path: Path, tag: str, caption: str) -> Path:
    """A one-row CSV and its image (a real one: local data is decoded before it is uploaded) in a folder of its
    own."""
    folder = tmp_path / tag
    folder.mkdir()
    Image.new("RGB", (8, 8), (ord(tag[0]), 0, 0)).save(folder / "img.png")
    path = folder / "train.csv"
    path.write_text(f"text,image\n{caption},img.png\n")
    return path


def fit(client: Client, name: str, train: Path) -> kubetune.Run:
    return kubetune.fit("ViT-B-32", train_data=str(train), run_name=name, client=client, gpus=0)


def submit(client: Client, name: str, train: Path) -> kubetune.Run:
    run_file = train.parent / "run.yaml"
    run_file.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneRun",
                                        "metadata": {"name": name},
                                        "spec": {"model": {"name": "ViT-B-32"}, "data": {"train": train.name},
                                                 "resources": {"gpus": 0}}}))
    return client.submit(run_file)


def train_csv_of(api: FakeRuns, name: str) -> str:
    """The train CSV the stored run points at, as uploaded."""
    return Path(api.objects[("team", name)]["spec"]["data"]["train"]).read_text()


# ------------------------------------------------------------------------------------------------ store
def test_local_store_delete_prefix_removes_only_the_keys_under_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("inputs/a/train.csv", "inputs/a/images/1.png", "inputs/ab/train.csv", "inputs/b/train.csv"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("inputs/a") == 2
    assert store.list() == ["inputs/ab/train.csv", "inputs/b/train.csv"]
    assert store.delete_prefix("inputs/a") == 0  # already gone: not an error
    assert store.delete_prefix("inputs/b/train.csv") == 0  # a key, not a prefix
    assert store.child("inputs").delete_prefix("ab") == 1
    assert store.list() == ["inputs/b/train.csv"]
    for prefix in ("", "/", "."):
        with pytest.raises(StoreError, match="every key"):
            store.delete_prefix(prefix)
    with pytest.raises(StoreError, match=r"\.\."):
        store.delete_prefix("../root")
    assert store.list() == ["inputs/b/train.csv"]


# ------------------------------------------------------------------------------------------------ uploads
def test_upload_ids_sort_by_time_and_differ_within_a_second() -> None:
    ids = [new_upload_id() for _ in range(20)]
    assert all(re.fullmatch(UPLOAD_ID, i) for i in ids)
    assert len(set(ids)) == 20


@pytest.mark.parametrize("create", [fit, submit])
def test_each_submission_uploads_under_its_own_prefix_and_runs_of_other_names_are_unaffected(
        create: Callable[[Client, str, Path], kubetune.Run], client: Client, api: FakeRuns, bucket: LocalStore,
        tmp_path: Path) -> None:
    shoes = create(client, "shoes", dataset(tmp_path, "a", "a red shoe"))
    boots = create(client, "boots", dataset(tmp_path, "b", "a blue boot"))
    for run, caption in ((shoes, "a red shoe"), (boots, "a blue boot")):
        match = re.fullmatch(rf"{re.escape(bucket.uri())}/kubetune/team/{run.name}/inputs/({UPLOAD_ID})/train/"
                             "train.csv", run.spec.data.train)
        assert match, run.spec.data.train
        assert caption in train_csv_of(api, run.name)
    keys = bucket.list()
    assert len(keys) == 4 and sorted({k.split("/")[2] for k in keys}) == ["boots", "shoes"], keys


@pytest.mark.parametrize("name", ["Shoes", "shoes_v2", "-shoes", "shoes-", "shoes..v2", ".shoes", "s" * 254, ""])
def test_an_invalid_run_name_is_refused_before_anything_is_uploaded(name: str, client: Client, api: FakeRuns,
                                                                    bucket: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigInvalid, match=r"metadata\.name") as info:
        client.create(build_spec("ViT-B-32", str(dataset(tmp_path, "a", "a red shoe")), gpus=0),
                      name=name)
    assert info.value.hint and "DNS-1123" in info.value.hint
    assert bucket.list() == [] and api.calls == []


def test_an_invalid_name_in_a_run_file_is_refused_before_anything_is_uploaded(client: Client, api: FakeRuns,
                                                                             bucket: LocalStore,
                                                                             tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigInvalid, match="'_'"):
        submit(client, "red_shoes", dataset(tmp_path, "a", "a red shoe"))
    assert bucket.list() == [] and api.calls == []


@pytest.mark.parametrize("create", [fit, submit])
def test_a_taken_run_name_is_refused_before_anything_is_uploaded(
        create: Callable[[Client, str, Path], kubetune.Run], client: Client, api: FakeRuns, bucket: LocalStore,
        tmp_path: Path) -> None:
    create(client, "shoes", dataset(tmp_path, "a", "a red shoe"))
    keys = bucket.list()
    with pytest.raises(errors.RunAlreadyExists):
        create(client, "shoes", dataset(tmp_path, "b", "a blue boot"))
    assert bucket.list() == keys
    assert api.calls[-1] == ("get", "shoes") and api.calls.count(("create", "shoes")) == 1
    assert "a red shoe" in train_csv_of(api, "shoes")


def test_a_run_created_while_uploading_keeps_its_data_and_the_late_submission_takes_its_uploads_back(
        client: Client, api: FakeRuns, bucket: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, late = dataset(tmp_path, "a", "a red shoe"), dataset(tmp_path, "b", "a blue boot")
    put_file = bucket.put_file
    raced: list[kubetune.Run] = []
    started: list[bool] = []

    def put_file_after_the_other_submission(key: str, path: Any) -> None:
        if not started:  # the name was free when the late submission looked; now the other one takes it
            started.append(True)
            raced.append(fit(client, "shoes", first))
        put_file(key, path)

    monkeypatch.setattr(bucket, "put_file", put_file_after_the_other_submission)
    with pytest.raises(errors.RunAlreadyExists):
        fit(client, "shoes", late)
    assert api.calls.count(("create", "shoes")) == 2  # the late one met the 409, not the early look
    assert "a red shoe" in train_csv_of(api, "shoes")
    own = re.escape(bucket.uri()) + rf"/kubetune/team/shoes/inputs/({UPLOAD_ID})/"
    match = re.match(own, raced[0].spec.data.train)
    assert match
    assert bucket.list() == [f"kubetune/team/shoes/inputs/{match[1]}/train/{f}" for f in ("img.png", "train.csv")]


@pytest.mark.parametrize(("status", "error"), [(422, errors.ConfigInvalid), (403, errors.ClusterUnavailable),
                                               (500, errors.KubetuneError)])
def test_a_create_the_api_server_refuses_takes_its_uploads_back(status: int, error: type[Exception], client: Client,
                                                                api: FakeRuns, bucket: LocalStore,
                                                                tmp_path: Path) -> None:
    api.reject = ApiException(status=status, reason="Refused")
    with pytest.raises(error):
        fit(client, "shoes", dataset(tmp_path, "a", "a red shoe"))
    assert ("create", "shoes") in api.calls
    assert bucket.list() == []


def test_uploads_stay_when_the_run_was_created_but_the_answer_was_lost(client: Client, api: FakeRuns,
                                                                     bucket: LocalStore, tmp_path: Path) -> None:
    api.lose_answer = True
    with pytest.raises(errors.ClusterUnavailable):
        fit(client, "shoes", dataset(tmp_path, "a", "a red shoe"))
    assert "a red shoe" in train_csv_of(api, "shoes")  # the run the API server took still has its data
    assert len(bucket.list()) == 2


def test_a_failed_clean_up_is_logged_and_the_create_error_stands(client: Client, api: FakeRuns, bucket: LocalStore,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def unreachable(prefix: str) -> int:
        raise StoreUnavailable(f"delete {prefix}: unreachable after 3 attempts")

    monkeypatch.setattr(bucket, "delete_prefix", unreachable)
    api.reject = ApiException(status=422, reason="Unprocessable Entity")
    with caplog.at_level(logging.WARNING, logger="kubetune.sdk"), pytest.raises(errors.ConfigInvalid,
                                                                               match="rejected the run"):
        fit(client, "shoes", dataset(tmp_path, "a", "a red shoe"))
    assert "could not delete the uploaded inputs" in caplog.text and "unreachable" in caplog.text


def test_a_failed_upload_takes_back_what_went_up_before_it(client: Client, api: FakeRuns, bucket: LocalStore,
                                                           tmp_path: Path) -> None:
    train = dataset(tmp_path, "a", "a red shoe")
    train.write_text(train.read_text() + "a lost shoe,missing.png\n")
    with pytest.raises(errors.ConfigInvalid, match=r"missing\.png"):  # unchecked: the upload meets it
        kubetune.fit("ViT-B-32", train_data=str(train), run_name="shoes", client=client, gpus=0, validate=False)
    assert bucket.list() == [] and ("create", "shoes") not in api.calls
