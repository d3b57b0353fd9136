"""A run stopped at the worst moments and resumed ends with exactly the weights and metrics of a run never stopped.

The stop is what the trainer's SIGTERM handler does (``__main__.on_sigterm``): set the stop flag, and outside
the training loop raise :class:`Preempted` where the run is. An emitter fires it at a chosen event, so the
moment is exact instead of racing a signal against a fast tiny model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kt_trainer_helpers import tiny_spec, write_run
from kubetune.api.trainer_env import TrainerEnv
from kubetune_trainer.config import build_parser, resolve
from kubetune_trainer.events import Emitter
from kubetune_trainer.run import Preempted, StopFlag, Trainer
from safetensors.torch import load_file

pytestmark = pytest.mark.unit

Trigger = Callable[[str, dict[str, Any]], bool]


class StopAt(Emitter):
    """Records events and behaves like a SIGTERM arriving right after the first event ``when`` matches."""

    def __init__(self, stop: StopFlag, when: Trigger | None) -> None:
        super().__init__(stream=io.StringIO())
        self.stop, self.when = stop, when
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: Any, **fields: Any) -> None:
        super().emit(event_type, **fields)
        self.events.append((str(event_type), fields))
        if self.when is not None and self.when(str(event_type), fields):
            self.when = None
            self.stop.requested = True
            if not self.stop.in_loop:
                raise Preempted("SIGTERM (test)")


def _attempt(config: Path, out: Path, when: Trigger | None,
             env: TrainerEnv | None = None) -> tuple[bool, list[tuple[str, dict[str, Any]]]]:
    """One trainer attempt in this process; (preempted?, events)."""
    stop = StopFlag()
    emitter = StopAt(stop, when)
    cfg = resolve(build_parser().parse_args(["--config", str(config), "--output-dir", str(out)]), env)
    try:
        Trainer(cfg, emitter, stop).run()
    except Preempted:
        return True, emitter.events
    return False, emitter.events


def _final(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    artifact = out / "artifact"
    weights = {f"{tower}/{k}": v for tower in ("clip-text", "clip-vision")
               for k, v in load_file(str(artifact / tower / "model.safetensors")).items()}
    metrics = json.loads((artifact / "metrics.json").read_text())
    history = json.loads((artifact / "metadata.json").read_text())["training"]["history"]
    return weights, metrics, history


@pytest.fixture(scope="module")
def run_spec(synthetic_data: dict[str, Path]) -> dict[str, Any]:
    # 224 training pairs (valSplit), 7 steps per epoch, 3 epochs; retrieval after every epoch; the best model by
    # validation loss; the default train transform's random crop is the augmentation that must replay
    return tiny_spec(str(synthetic_data["train"]),
                     data={"train": str(synthetic_data["train"]), "valSplit": 0.125,
                           "query": str(synthetic_data["eval"]), "index": str(synthetic_data["eval"])},
                     training={"epochs": 3},
                     callbacks={"evaluation": {"limit": 10, "everyEpochs": 1},
                                "bestModel": {"monitor": "val_loss", "mode": "min"}},
                     runPolicy={"checkpointEveryEpochs": 0})


@pytest.fixture(scope="module")
def uninterrupted(run_spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    preempted, _ = _attempt(write_run(root / "run.yaml", run_spec), root / "out", None)
    assert not preempted
    return root / "out"


STOPS: dict[str, Trigger] = {
    "mid-epoch": lambda kind, f: kind == "progress" and f["step"] == 10,
    "last-step": lambda kind, f: kind == "progress" and f["step"] == f["total_steps"],
    "final-evaluation": lambda kind, f: kind == "evaluation" and f["stage"] == "after",
}


@pytest.mark.parametrize(("moment", "workers"), [*((m, 0) for m in STOPS), ("mid-epoch", 2)])
def test_a_run_stopped_and_resumed_ends_bit_identical(moment: str, workers: int, run_spec: dict[str, Any],
                                                       uninterrupted: Path, tmp_path: Path) -> None:
    # with 2 loader workers (the spec's default) against the uninterrupted run's none: the augmentation must not
    # depend on which process transforms a sample, nor on where the resumed attempt restarts the epoch
    every_step = TrainerEnv(progress_seconds=0)  # a progress event at every step
    spec = {**run_spec, "training": {**run_spec["training"], "numWorkers": workers}}
    config, out = write_run(tmp_path / "run.yaml", spec), tmp_path / "out"
    preempted, first = _attempt(config, out, STOPS[moment], every_step)
    assert preempted and not any(kind == "artifact" for kind, _ in first)
    saved = [f["step"] for kind, f in first if kind == "checkpoint"]
    assert saved, "a stopped attempt always leaves a checkpoint"

    preempted, second = _attempt(config, out, None, every_step)
    assert not preempted
    started = next(f for kind, f in second if kind == "started")
    assert started["resumed_from_step"] == saved[-1]
    trained_again = [f["step"] for kind, f in second if kind == "progress"]
    assert not trained_again or trained_again[0] == saved[-1] + 1  # nothing is trained twice
    if moment == "final-evaluation":
        assert trained_again == [] and saved[-1] == started["total_steps"]

    weights, metrics, history = _final(out)
    want_weights, want_metrics, want_history = _final(uninterrupted)
    assert weights.keys() == want_weights.keys()
    for key, value in want_weights.items():
        assert torch.equal(weights[key], value), f"{moment}: {key} differs"
    assert metrics == want_metrics
    assert [h["epoch"] for h in history] == [1, 2, 3]  # the last epoch's end is recorded once, resumed or not
    assert history == want_history
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]  # everyEpochs results kept (epoch 3 is "after")
