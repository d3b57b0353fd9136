"""Callbacks and losses inside full tiny runs: SigLIP, early stopping with the best-model checkpoint, WiSE-FT."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG, of_type, run_trainer, tiny_spec, write_run
from kubetune_trainer import export
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.unit


def _run(root: Path, spec: dict[str, Any]) -> tuple[int, list[Any], str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    code, events, raw = run_trainer(["--config", str(write_run(root / "run.yaml", spec)),
                                     "--output-dir", str(root / "out")])
    return code, events, raw, root / "out"


def _artifact_state(out: Path) -> dict[str, torch.Tensor]:
    return export.load_artifact_state_dict(out / "artifact")


def test_siglip_loss_trains(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config.update(init_logit_scale=2.302585, init_logit_bias=-3.434)  # t = 10, b = −ln 31: see below
    # (not "…siglip…": open_clip.get_tokenizer gives any name containing "siglip" the hub SigLIP tokenizer)
    spec = tiny_spec(str(synthetic_data["train"]), model={"name": "kt-tiny-sig", "config": config},
                     training={"epochs": 4, "loss": "SigLIPLoss", "learningRate": 2e-3},
                     callbacks={"evaluation": {"enabled": False}})
    code, events, raw, out = _run(tmp_path, spec)
    assert code == 0, raw[-3000:]
    losses = [e.train_loss for e in of_type(events, "metrics")]
    assert len(losses) == 4 and all(x is not None for x in losses)
    # SigLIP's loss is −Σ log σ(±(t·cos + b)) over all batch² pairs, divided by the batch. A random init has
    # near-identical embeddings (cos ≈ 1), so the 31 negatives per row cost a lot: epoch 1 averages ≈7.7.
    # The best a model can do without telling pairs apart (one constant logit) is ln 32 + 31·ln(32/31) ≈ 4.45;
    # getting below it needs the towers to separate matching from non-matching pairs (≈4.39 after 4 epochs
    # here: SigLIP learns slower than ClipLoss on this tiny setup, so the margin is small but deterministic).
    bias_only = math.log(32) + 31 * math.log(32 / 31)
    assert losses[-1] < bias_only and losses[-1] < 0.7 * losses[0]
    scalars = json.loads((out / "artifact" / "metadata.json").read_text())["model_scalars"]
    assert "logit_bias" in scalars and scalars["logit_bias"][0] != pytest.approx(-3.434)  # the bias was trained


def test_early_stopping_restores_the_best_checkpoint(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    # Early stopping on val_loss with minDelta 100: no epoch can improve by that much, so with patience 2 the
    # run stops after epoch 3 of 10. The best model monitors train_loss in "max" mode: the loss falls, so the
    # best epoch is epoch 1 and the final weights must be epoch 1's, not those training ended with.
    spec = tiny_spec(str(synthetic_data["train"]), data={"train": str(synthetic_data["train"]),
                                                         "eval": str(synthetic_data["eval"])},
                     training={"epochs": 10, "learningRate": 2e-3},
                     callbacks={"evaluation": {"limit": 10},
                                "earlyStopping": {"monitor": "val_loss", "minDelta": 100, "patience": 2},
                                "bestModel": {"monitor": "train_loss", "mode": "max"}})
    code, events, raw, out = _run(tmp_path, spec)
    assert code == 0, raw[-3000:]
    metrics = of_type(events, "metrics")
    assert [m.epoch for m in metrics] == [1, 2, 3]
    assert metrics[0].train_loss > metrics[1].train_loss > metrics[2].train_loss
    (finished,) = of_type(events, "finished")
    assert finished.step == 3 * 8  # 3 epochs of 256 / 32 steps, not 10
    training = json.loads((out / "artifact" / "metadata.json").read_text())["training"]
    assert training["stopped_early"] is True and training["epochs_completed"] == 3
    (best_file,) = out.rglob("best.pt")
    best = torch.load(best_file, map_location="cpu", weights_only=True)
    final = _artifact_state(out)
    assert set(final) <= set(best)
    for key, value in final.items():
        torch.testing.assert_close(value, best[key].reshape(value.shape), rtol=0, atol=0, msg=key)
    evaluations = {e.stage: e.metrics for e in of_type(events, "evaluation")}
    assert set(evaluations) == {"before", "after"}


def test_wise_ft_final_weights_are_the_interpolation(tmp_path: Path, synthetic_data: dict[str, Path]) -> None:
    # θ₀: a saved random init; θ₁: a run without WiSE-FT; then the same run (same seed, same data order, CPU:
    # bit-identical training) with WiSE-FT α = 0.3 must end at (1 − α)θ₀ + αθ₁ on every floating tensor.
    open_clip.add_model_config(_config(tmp_path))
    torch.manual_seed(3)
    start = open_clip.create_model("kt-tiny-wise-init").state_dict()
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.items()}, str(weights))
    base = {"training": {"epochs": 1, "maxSteps": 3, "learningRate": 5e-3},
            "model": {"name": "kt-tiny", "config": copy.deepcopy(TINY_CONFIG), "weights": str(weights)}}
    plain = tiny_spec(str(synthetic_data["train"]), callbacks={"evaluation": {"enabled": False}}, **base)
    wise = tiny_spec(str(synthetic_data["train"]),
                     callbacks={"evaluation": {"enabled": False}, "wiseFt": {"alpha": 0.3}}, **base)
    code, _, raw, plain_out = _run(tmp_path / "plain", plain)
    assert code == 0, raw[-3000:]
    code, _, raw, wise_out = _run(tmp_path / "wise", wise)
    assert code == 0, raw[-3000:]
    tuned, mixed = _artifact_state(plain_out), _artifact_state(wise_out)
    start = load_file(str(weights))
    moved = 0
    for key, value in mixed.items():
        want = (0.7 * start[key].double() + 0.3 * tuned[key].double()).to(value.dtype).reshape(value.shape)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
        moved += int(not torch.equal(tuned[key].reshape(value.shape), start[key].reshape(value.shape)))
    assert moved > 10  # training changed the weights, so the interpolation is not trivially θ₀ = θ₁


def _config(root: Path) -> Path:
    path = root / "kt-tiny-wise-init.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def _relabelled(eval_csv: Path, name: str, text: Any) -> Path:
    """The eval images with ``text(colour and shape, background)`` as their text, beside the images the
    relative paths name."""
    import csv

    with eval_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        thing, background = row["text"].removeprefix("a ").split(" on a ")
        row["text"] = text(thing, background)
    path = eval_csv.with_name(name)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_wise_ft_sweep_reports_the_frontier_and_builds_the_chosen_alpha(tmp_path: Path,
                                                                       synthetic_data: dict[str, Path]) -> None:
    from kubetune_trainer.callbacks import SweepPoint, choose_alpha

    # the reference: the captions in a style the fine-tuning never sees ("white background, red circle");
    # zero-shot: 16 classes ("red circle"), prompted with each background
    reference = _relabelled(synthetic_data["eval"], "reference-reworded.csv", lambda t, b: f"{b}, {t}")
    labelled = _relabelled(synthetic_data["eval"], "zero-shot.csv", lambda t, b: t)
    templates = [f"a {{}} on a {b} background" for b in ("white", "black", "grey")]
    spec = tiny_spec(str(synthetic_data["train"]),
                     data={"train": str(synthetic_data["train"]), "eval": str(synthetic_data["eval"]),
                           "reference": str(reference), "zeroShot": str(labelled)},
                     training={"epochs": 3, "learningRate": 2e-3},
                     callbacks={"evaluation": {"limit": 10, "zeroShotTemplates": templates},
                                "wiseFt": {"sweep": [0.25, 0.5, 0.75, 1.0], "metric": "R@5", "keepReference": 0.9}})
    code, events, raw, out = _run(tmp_path, spec)
    assert code == 0, raw[-3000:]
    evaluations = {e.stage: e for e in of_type(events, "evaluation")}
    summary = evaluations["wise_ft"].model_extra
    frontier = summary["frontier"]
    assert [p["alpha"] for p in frontier] == [0.0, 0.25, 0.5, 0.75, 1.0]  # α = 0 added as the baseline
    assert all(p["reference"] is not None for p in frontier)
    before, after = evaluations["before"].metrics, evaluations["after"].metrics
    assert before is not None and after is not None
    assert frontier[0]["target"] == pytest.approx(before["R@5"])  # α = 0 is the starting model itself
    assert frontier[-1]["target"] > frontier[0]["target"] + 0.2  # fine-tuning helps the target
    chosen = choose_alpha([SweepPoint(**p) for p in frontier], 0.9)
    assert summary["alpha"] == chosen.alpha and summary["metric"] == "R@5"
    assert after["R@5"] == pytest.approx(chosen.target)  # the artifact is the model at the chosen α
    # zero-shot accuracy over 16 classes (chance 1/16) at every α, and the start's at α = 0
    assert frontier[0]["zero_shot"] == pytest.approx(before["zero_shot_top1"])
    assert frontier[-1]["zero_shot"] > max(2 / 16, frontier[0]["zero_shot"])
    assert after["zero_shot_top1"] == pytest.approx(next(p["zero_shot"] for p in frontier
                                                         if p["alpha"] == chosen.alpha))
    assert 0 <= after["zero_shot_top5"] <= 1
    saved = json.loads((out / "artifact" / "metrics.json").read_text())["wise_ft"]
    assert saved == {"metric": "R@5", "keep_reference": 0.9, "alpha": chosen.alpha, "frontier": frontier}
    from kubetune.sdk.report import svg_chart, wise_ft_frontier

    curves, title = wise_ft_frontier({"wise_ft": saved})
    assert curves["R@5 target"] == [(p["alpha"], p["target"]) for p in frontier]
    assert curves["R@5 reference"] == [(p["alpha"], p["reference"]) for p in frontier]
    assert f"α = {chosen.alpha:g} chosen" in title and "<svg" in svg_chart(curves, title, "α")
