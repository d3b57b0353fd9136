"""The optimisation stages, as in open_clip_train (params, scheduler, precision, one training step).

One optimizer step consumes ``grad_accumulation`` micro-batches. With more than one, features of all micro-
batches are cached first and each micro-batch is re-forwarded with the others' cached features as negatives,
exactly open_clip's ``--accum-freq``: the contrastive loss sees the whole accumulated batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

LOGIT_SCALE_MAX = math.log(100)
Batch = tuple[torch.Tensor, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ precision
def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    # fp16 needs a loss scaler, which only exists for CUDA here: on the CPU "amp" autocasts to bf16, whose
    # exponent range is fp32's
    if precision == "amp" and device.type == "cuda":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision in ("amp", "amp_bf16"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def input_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device=device.type) if precision == "amp" and device.type == "cuda" else None


class MasterWeights:
    """fp32 master copies of a bf16 model's trainable parameters (``precision: bf16``).

    An update of lr 1e-5 is below half a bf16 ulp for any weight above ~2.6e-3, so AdamW applied to bf16 weights
    loses most small-lr updates. The optimizer steps these fp32 copies instead; the model's bf16 weights are the
    copies rounded after each step, and the copies travel with the checkpoint.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.groups: list[dict[str, Any]] = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = param.detach().clone().float().requires_grad_(True)
                self.pairs.append((param, master))
                masters.append(master)
            self.groups.append({**group, "params": masters})

    def params(self) -> list[torch.Tensor]:
        return [master for _, master in self.pairs]

    def grads_to_master(self) -> None:
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()

    @torch.no_grad()
    def master_to_model(self, logit_scale: torch.Tensor | None = None) -> None:
        for param, master in self.pairs:
            if param is logit_scale:
                master.clamp_(0, LOGIT_SCALE_MAX)
            param.copy_(master)

    def state_dict(self) -> list[torch.Tensor]:
        return [master.detach().clone() for master in self.params()]

    @torch.no_grad()
    def load_state_dict(self, saved: Sequence[torch.Tensor]) -> None:
        if len(saved) != len(self.pairs):
            raise ValueError(f"checkpoint has {len(saved)} master weights, the model {len(self.pairs)}")
        for (param, master), value in zip(self.pairs, saved, strict=True):
            master.copy_(value)
            param.copy_(value)


def master_weights(precision: str, groups: list[dict[str, Any]]) -> MasterWeights | None:
    return MasterWeights(groups) if precision == "bf16" else None


# ------------------------------------------------------------------------------------------------ params
def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip_train's exclusion rule: gains, biases, norms and logit_scale get no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": weight_decay},
    ]


def make_optimizer(kind: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW/Adam with open_clip's ViT defaults (betas 0.9/0.98, eps 1e-6), or SGD with momentum 0.9."""
    # the fused kernels (one kernel for all parameters, CPU and CUDA) need floating parameters on one device type
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() for p in params) and len({p.device.type for p in params}) == 1
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {kind!r}")


# ------------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): open_clip's warmup, then cosine/constant/linear."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    raise ValueError(f"unknown scheduler {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------ loss
def make_loss(kind: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's losses; across ranks ClipLoss gathers features with gradients and computes local rows."""
    if kind == "SigLIPLoss":
        return SigLipLoss(rank=rank, world_size=world_size)
    distributed = world_size > 1
    return ClipLoss(local_loss=distributed, gather_with_grad=distributed, cache_labels=True, rank=rank,
                    world_size=world_size)


def loss_inputs(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("image_features", "text_features", "logit_scale", "logit_bias")
    return {k: out[k] for k in keys if out.get(k) is not None}


def _loss_value(loss_fn: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = loss_fn(**inputs, output_dict=True)
    return sum(losses.values())


# ------------------------------------------------------------------------------------------------ one step
def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Batch], device: torch.device, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, grad_clip_norm: float | None = None,
               master: MasterWeights | None = None) -> float:
    """One optimizer step over ``micro_batches`` (open_clip semantics); returns the loss as a float.

    With ``master`` the optimizer holds the fp32 master weights: gradients go to them, and the model gets the
    updated weights back after the step.
    """
    cast = autocast(precision, device)
    dtype = input_dtype(precision)
    batches = [(images.to(device=device, dtype=dtype, non_blocking=True), texts.to(device=device, non_blocking=True))
               for images, texts in micro_batches]
    optimizer.zero_grad(set_to_none=True)
    if master is not None:  # the optimizer's parameters are the masters: the model's gradients are separate
        model.zero_grad(set_to_none=True)
    if len(batches) == 1:
        images, texts = batches[0]
        with cast():
            total = _loss_value(loss_fn, loss_inputs(model(images, texts)))
        _backward(total, scaler)
        loss_value = total.detach()
    else:
        cached: dict[str, list[torch.Tensor]] = {"image_features": [], "text_features": []}
        with torch.no_grad(), cast():
            for images, texts in batches:
                out = model(images, texts)
                for key in cached:
                    cached[key].append(out[key])
        loss_value = torch.zeros((), device=device)
        for j, (images, texts) in enumerate(batches):
            with cast():
                out = model(images, texts)
                inputs = {k: torch.cat([*v[:j], out[k], *v[j + 1:]]) for k, v in cached.items()}
                inputs.update({k: out[k] for k in ("logit_scale", "logit_bias") if out.get(k) is not None})
                total = _loss_value(loss_fn, inputs)
            _backward(total, scaler)
            loss_value = total.detach()
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm, norm_type=2.0)
        scaler.step(optimizer)
        scaler.update()
    elif master is not None:
        master.grads_to_master()
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(master.params(), grad_clip_norm, norm_type=2.0)
        optimizer.step()
        master.master_to_model(logit_scale=unwrap(model).logit_scale)  # type: ignore[arg-type]
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm, norm_type=2.0)
        optimizer.step()
    clamp_logit_scale(model)
    return float(loss_value)


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp to [0, ln 100] (a temperature of at least 0.01), as in the CLIP paper and open_clip."""
    scale = unwrap(model).logit_scale
    assert isinstance(scale, torch.Tensor)
    scale.clamp_(0, LOGIT_SCALE_MAX)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def validation_loss(model: nn.Module, loss_fn: nn.Module, batches: Iterator[Batch] | Sequence[Batch],
                    device: torch.device, precision: str = "fp32") -> float:
    """Mean contrastive loss over the validation batches (each batch its own negatives), weighted by size."""
    was_training = model.training
    model.eval()
    cast, dtype = autocast(precision, device), input_dtype(precision)
    total, count = 0.0, 0
    for images, texts in batches:
        if images.shape[0] < 2:
            continue
        with cast():
            out = model(images.to(device=device, dtype=dtype), texts.to(device))
            loss = _loss_value(loss_fn, loss_inputs(out))
        total += float(loss) * images.shape[0]
        count += images.shape[0]
    model.train(was_training)
    return total / count if count else math.nan


@torch.no_grad()
def encode(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor] | Sequence[torch.Tensor],
           device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Embeddings of every batch, gathered on the CPU in float32."""
    cast, dtype = autocast(precision, device), input_dtype(precision)
    out = []
    for batch in batches:
        batch = batch.to(device=device, dtype=dtype) if batch.is_floating_point() else batch.to(device)
        with cast():
            out.append(fn(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
