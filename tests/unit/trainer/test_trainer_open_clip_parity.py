"""kubetune's training step equals open_clip_train's ``train_one_epoch`` (ClipLoss, AdamW, cosine, fp32, CPU).

Identical initial weights and identical preprocessed batches: the first 20 losses agree within 1e-4, with and
without gradient accumulation (open_clip's ``--accum-freq`` feature-cache scheme).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
from kt_trainer_helpers import TINY_CONFIG
from kubetune_trainer import loop
from open_clip_train.data import DataInfo
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch
from torch import nn

pytestmark = pytest.mark.unit
STEPS, BATCH, LR, WARMUP = 20, 8, 5e-4, 3


class Recording(nn.Module):
    """Wraps open_clip's loss to record the value of each call (train_one_epoch does not return losses)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.values = inner, []  # type: ignore[var-annotated]

    def forward(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = self.inner(**kwargs)
        self.values.append(float(sum(out.values())))
        return out


class _Loader(list):  # type: ignore[type-arg]
    num_batches = 0
    num_samples = 0


def _open_clip_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # exactly open_clip_train.main's construction (lr 5e-4, betas .9/.98, eps 1e-6, wd .2 with exclusions)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
                             lr=LR, betas=(0.9, 0.98), eps=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_losses_match_open_clip_train_one_epoch(accum: int) -> None:
    torch.manual_seed(0)
    open_clip.factory._MODEL_CONFIGS["kt-tiny-parity"] = TINY_CONFIG
    reference = open_clip.create_model("kt-tiny-parity", output_dict=True)
    ours = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(1, 49407, (BATCH, 16), generator=gen))
               for _ in range(STEPS * accum)]

    loader = _Loader(batches)
    loader.num_batches, loader.num_samples = len(batches), len(batches) * BATCH
    optimizer = _open_clip_optimizer(reference)
    loss = Recording(open_clip.create_loss(SimpleNamespace(distill=False, model="kt-tiny", siglip=False,
                                                           local_loss=False, gather_with_grad=False, rank=0,
                                                           world_size=1, horovod=False)))
    args = SimpleNamespace(device="cpu", precision="fp32", accum_freq=accum, distill=False, skip_scheduler=False,
                           grad_clip_norm=None, horovod=False, log_every_n_steps=1000, batch_size=BATCH,
                           world_size=1, rank=0, local_rank=0, wandb=False)
    scheduler = cosine_lr(optimizer, LR, WARMUP, STEPS)
    train_one_epoch(reference, {"train": DataInfo(loader)}, loss, 0, optimizer, None, scheduler, None, args)
    expected = loss.values[accum - 1::accum]  # with accumulation, the loss of the last re-forward per step

    opt = loop.make_optimizer("adamw", loop.param_groups(ours, 0.2), LR)
    loss_fn = loop.make_loss("CLIPLoss")
    got = []
    for step in range(STEPS):
        loop.set_lr(opt, loop.lr_at(step, LR, WARMUP, STEPS, "cosine"))
        got.append(loop.train_step(ours, loss_fn, opt, batches[step * accum:(step + 1) * accum], torch.device("cpu")))
    assert len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= 1e-4, f"step {step}: kubetune {a:.6f} vs open_clip {b:.6f}"
    assert got[-1] < got[0]  # and it is learning something, the same thing
    for (name, p), q in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)
