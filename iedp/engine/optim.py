"""Optimizer parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from iedp.config import TrainConfig

logger = logging.getLogger(__name__)


def parameter_groups(
    model: nn.Module, unet: nn.Module, lr: float, weight_decay: float, unet_lr_mult: float
) -> list[dict]:
    """AdamW groups: the UNet at ``lr × unet_lr_mult``, everything else trainable at ``lr``; no weight decay on
    biases and norm weights (tensors with fewer than 2 dimensions). Frozen parameters are left out.

    The UNet group is chosen by membership (``unet.parameters()``), not by parameter names.
    """
    unet_ids = {id(p) for p in unet.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in unet_ids, p.ndim >= 2), []).append(p)
    result = []
    for (in_unet, decay), params in sorted(groups.items()):
        group_lr = lr * (unet_lr_mult if in_unet else 1.0)
        result.append(
            {
                "params": params,
                "lr": group_lr,
                "initial_lr": group_lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'unet' if in_unet else 'head'}{'' if decay else '_no_decay'}",
            }
        )
        logger.info(
            "group %s: %d tensors, %d parameters",
            result[-1]["name"],
            len(params),
            sum(p.numel() for p in params),
        )
    return result


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    ``poly``: linear warm-up from ``warmup_ratio`` over ``warmup_steps``, then (1 - step/max_steps)^power decay from
    lr to ``min_lr`` (mmseg's PolyLR after LinearLR). ``rise_fall``: linear rise from ``min_lr`` to lr over
    ``warmup_steps``, then linear fall back to ``min_lr`` at ``max_steps`` (the NYUv2 recipe's one-cycle shape).
    """
    total, warmup, lr = config.max_steps, config.warmup_steps, config.lr
    floor = config.min_lr / lr if lr > 0 else 0.0
    if config.schedule == "poly":
        decay = floor + (1 - floor) * max(0.0, 1 - step / total) ** config.poly_power
        if step < warmup:
            ramp = config.warmup_ratio + (1 - config.warmup_ratio) * step / warmup
            return decay * ramp
        return decay
    if step < warmup:
        return floor + (1 - floor) * step / warmup
    return floor + (1 - floor) * max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(
    model: nn.Module, unet: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = parameter_groups(model, unet, config.lr, config.weight_decay, config.unet_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler
