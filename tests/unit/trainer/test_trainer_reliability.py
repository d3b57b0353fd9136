"""Untrusted input in the trainer: pickle-bearing weights and checkpoints are refused (``weights_only=True``; the
payload never runs), and malformed datasets fail with the set, the row and the reason."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api.spec import DataSpec
from kubetune.storage import LocalStore
from kubetune_trainer.data import DataError, Fetcher, load_set
from kubetune_trainer.model import ModelError, load_weights
from PIL import Image

pytestmark = pytest.mark.unit


class _Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"weight": torch.zeros(2, 2)}, "extra": _Payload(marker)}, path)
    with path.open("rb") as f:  # sanity: plain unpickling would run it
        assert f.read(2)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_bearing_weights_are_refused(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    weights = _evil_file(tmp_path / f"weights{suffix}", marker)
    with pytest.raises(ModelError, match="cannot load weights"):
        load_weights(torch.nn.Linear(2, 2), weights)
    assert not marker.exists()


def test_pickle_bearing_checkpoint_is_refused(tmp_path: Path) -> None:
    from kubetune_trainer import checkpoint

    marker = tmp_path / "pwned"
    store = LocalStore(tmp_path / "store")
    _evil_file(tmp_path / "evil.pt", marker)
    store.put_file("checkpoints/best.pt", tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_weights(store, tmp_path, "checkpoints/best.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- datasets
def _png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "big.png").write_bytes(_png(64))
    return tmp_path


def _load(folder: Path, body: bytes, name: str = "train.csv", **spec: Any) -> Any:
    path = folder / name
    path.write_bytes(body)
    return load_set("train", str(path), DataSpec(train=str(path), **spec), Fetcher(folder / "cache"))


@pytest.mark.parametrize(("body", "message"), [
    (b"", "no column 'text' (columns: none)"),
    (b"text,image\n", "holds no usable pairs"),
    ("text,image\ncaf\u00e9,a.png\n".encode("latin-1"), "is not UTF-8 text"),
    ("text,image\nhello,a.png\n".encode("utf-16"), "is not UTF-8 text"),
    (b"caption;picture\nhello;a.png\n", "no column 'text'"),
])
def test_empty_sets_wrong_encodings_and_missing_columns(folder: Path, body: bytes, message: str) -> None:
    with pytest.raises(DataError) as info:
        _load(folder, body)
    assert str(info.value).startswith("train set") and message in str(info.value)


def test_huge_captions(folder: Path) -> None:
    # 100,000 characters: fine (the tokenizer truncates); beyond the CSV field limit: a clear error naming the row.
    pairs = _load(folder, f"text,image\nshort,a.png\n{'w' * 100_000},a.png\n".encode())
    assert len(pairs) == 2 and len(pairs.pairs[1].text) == 100_000
    with pytest.raises(DataError) as info:
        _load(folder, f"text,image\nshort,a.png\nok,a.png\n{'w' * 200_000},a.png\n".encode())
    assert info.value.row == 3 and "malformed CSV" in str(info.value) and "field larger" in str(info.value)


def test_decompression_bomb_is_a_bad_row(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.png has 4096 pixels: more than twice the limit
    with pytest.raises(DataError) as info:
        _load(folder, b"text,image\nfine,a.png\nbomb,big.png\n")
    assert info.value.row == 2 and "unreadable" in str(info.value) and "DecompressionBomb" in str(info.value)
    pairs = _load(folder, b"text,image\nfine,a.png\nbomb,big.png\n", skip_bad_rows=True)
    assert len(pairs) == 1 and pairs.skipped == 1


# ------------------------------------------------------------------------------------------- killed trainer
def test_sigkilled_trainer_resumes_from_the_latest_checkpoint(tmp_path: Path,
                                                              synthetic_data: dict[str, Path]) -> None:
    # A deleted pod past its grace period, a node lost, an OOM kill: no chance to checkpoint. The replacement
    # (a new pod of the same Job, or the operator's next attempt) resumes from the store's latest.json; the steps
    # redone are at most one checkpoint interval.
    import os
    import signal
    import subprocess
    import sys

    from kt_trainer_helpers import of_type, run_trainer, tiny_spec, write_run
    from kubetune.api.events import parse_line

    every = 3
    spec = tiny_spec(str(synthetic_data["train"]), training={"epochs": 3},
                     runPolicy={"checkpointEverySteps": every, "checkpointEveryEpochs": 0},
                     callbacks={"evaluation": {"enabled": False}})
    argv = ["--config", str(write_run(tmp_path / "run.yaml", spec)), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "KUBETUNE_PROGRESS_SECONDS": "0"})
    assert proc.stdout is not None
    last_step, checkpoints = 0, []
    for line in proc.stdout:
        event = parse_line(line.rstrip("\n"))
        if event is None:
            continue
        if event.type == "checkpoint":
            checkpoints.append(event.step)
        if event.type == "progress" and event.step:
            last_step = event.step
            if checkpoints and last_step % every == every - 1:  # mid-interval, after a checkpoint
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and checkpoints

    code, events, raw = run_trainer(argv)
    assert code == 0, raw[-2000:]
    resumed = of_type(events, "started")[0].model_extra["resumed_from_step"]
    redone = last_step - resumed
    assert resumed == checkpoints[-1] and 0 < redone <= every, (last_step, resumed, checkpoints)
    assert of_type(events, "progress")[0].step == resumed + 1 and of_type(events, "artifact")
    print(f"\nSIGKILL at step {last_step}: resumed from step {resumed}, {redone} step(s) redone "
          f"(checkpoint every {every})")
