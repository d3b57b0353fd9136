"""WiSE-FT math, monitored metrics (best model / early stopping), schedules and weight-decay groups."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG
from kubetune_trainer.callbacks import Monitor, SweepPoint, choose_alpha, improved, wise_ft
from kubetune_trainer.loop import lr_at, no_weight_decay, param_groups

pytestmark = pytest.mark.unit


def _states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen).half(),
             "bn.num_batches_tracked": torch.tensor(5)}
    tuned = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen).half(),
             "bn.num_batches_tracked": torch.tensor(90)}
    return start, tuned


def test_wise_ft_interpolates_floating_tensors_only() -> None:
    start, tuned = _states()
    mixed = wise_ft(start, tuned, 0.4)
    torch.testing.assert_close(mixed["w"], 0.6 * start["w"] + 0.4 * tuned["w"])
    assert mixed["b"].dtype == torch.float16
    torch.testing.assert_close(mixed["b"].float(), 0.6 * start["b"].float() + 0.4 * tuned["b"].float(),
                               atol=1e-3, rtol=0)
    assert int(mixed["bn.num_batches_tracked"]) == 90  # integers are not interpolated
    torch.testing.assert_close(wise_ft(start, tuned, 0.0)["w"], start["w"])
    torch.testing.assert_close(wise_ft(start, tuned, 1.0)["w"], tuned["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_wise_ft_rejects_alpha_outside_0_1(alpha: float) -> None:
    start, tuned = _states()
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(start, tuned, alpha)


def test_wise_ft_rejects_mismatched_models() -> None:
    start, tuned = _states()
    with pytest.raises(ValueError, match="same keys"):
        wise_ft(start, {k: v for k, v in tuned.items() if k != "w"}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        wise_ft(start, {**tuned, "w": torch.zeros(4, 3)}, 0.5)


def test_monitor_tracks_best_and_patience() -> None:
    monitor = Monitor("val_loss", "min", min_delta=0.01)
    assert monitor.update({"val_loss": 1.0}, 1) is True
    assert monitor.update({"val_loss": 0.995}, 2) is False  # within min_delta: not an improvement
    assert monitor.update({"val_loss": 0.9}, 3) is True and monitor.best_epoch == 3
    assert monitor.update({"train_loss": 0.1}, 4) is None  # metric absent
    assert monitor.update({"val_loss": 1.2}, 5) is False and monitor.bad_epochs == 1
    restored = Monitor("val_loss", "min")
    restored.load_state_dict(monitor.state_dict())
    assert restored.best == 0.9 and restored.bad_epochs == 1
    assert improved(0.5, 0.4, "max") and not improved(math.nan, None, "max")


def test_schedules_match_open_clip() -> None:
    from open_clip_train.scheduler import const_lr, cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine, const = cosine_lr(opt, 0.1, 5, 50), const_lr(opt, 0.1, 5, 50)
    for step in range(50):
        assert lr_at(step, 0.1, 5, 50, "cosine") == pytest.approx(cosine(step), abs=1e-12)
        assert lr_at(step, 0.1, 5, 50, "constant") == pytest.approx(const(step), abs=1e-12)
    assert lr_at(5, 0.1, 5, 50, "linear") == pytest.approx(0.1) and lr_at(50, 0.1, 5, 50, "linear") == 0.0


def test_weight_decay_excludes_gains_biases_and_logit_scale() -> None:
    open_clip.factory._MODEL_CONFIGS["kt-tiny-wd"] = TINY_CONFIG
    model = open_clip.create_model("kt-tiny-wd")
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" not in decayed and not any("bias" in n or ".ln_" in n for n in decayed)
    assert "visual.conv1.weight" in decayed and "token_embedding.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_weight_decay("ln_final.weight", torch.zeros(3))


FRONTIER = [SweepPoint(0.0, 0.30, 0.80), SweepPoint(0.25, 0.50, 0.79), SweepPoint(0.5, 0.60, 0.77),
            SweepPoint(0.75, 0.66, 0.70), SweepPoint(1.0, 0.70, 0.50)]


@pytest.mark.parametrize(("keep", "alpha"), [
    (0.95, 0.5),   # 0.77 >= 0.76: the highest target that keeps 95 % of the start's 0.80
    (0.98, 0.25),  # 0.79 >= 0.784 > 0.77: only alpha 0.25 is close enough
    (1.0, 0.0),    # nothing may be lost: the starting model
    (0.6, 1.0),    # 0.50 >= 0.48: the fully fine-tuned model keeps enough
    (0.0, 1.0),    # the reference does not matter
])
def test_wise_ft_keeps_the_best_target_that_keeps_enough_reference(keep: float, alpha: float) -> None:
    assert choose_alpha(FRONTIER, keep).alpha == alpha


def test_wise_ft_without_a_reference_takes_the_best_target_and_ties_go_to_the_start() -> None:
    points = [SweepPoint(0.0, 0.3), SweepPoint(0.5, 0.7), SweepPoint(1.0, 0.7)]
    assert choose_alpha(points, 0.95).alpha == 0.5
    with pytest.raises(ValueError, match="alpha 0"):
        choose_alpha(points[1:], 0.95)
