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
    if precision == "amp":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "amp_bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def input_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device=device.type) if precision == "amp" and device.type == "cuda" else None


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
               scaler: torch.amp.GradScaler | None = None, grad_clip_norm: float | None = None) -> float:
    """One optimizer step over ``micro_batches`` (open_clip semantics); returns the loss as a float."""
    cast = autocast(precision, device)
    dtype = input_dtype(precision)
    batches = [(images.to(device=device, dtype=dtype, non_blocking=True), texts.to(device=device, non_blocking=True))
               for images, texts in micro_batches]
    optimizer.zero_grad(set_to_none=True)
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
