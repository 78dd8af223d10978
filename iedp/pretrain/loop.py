"""The optimisation loop shared by the three pre-training stages."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from iedp.engine.optim import decays_by_rank

logger = logging.getLogger(__name__)


def fit(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
    log_every: int,
    name: str,
) -> list[float]:
    """Minimise ``loss_fn(step)`` over every trainable parameter of ``model``; returns the loss of each step.

    AdamW with weight decay on tensors of rank >= 2 only, linear warm-up then cosine decay (diffusers'
    ``get_scheduler``), gradient norm clipped to 1. The model is left in eval mode.

    Raises:
        FloatingPointError: the loss is NaN or infinite (the message names the stage and the step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays_by_rank(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not decays_by_rank(p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=math.ceil(warmup_fraction * steps), num_training_steps=steps
    )
    logger.info(
        "%s: %d steps, %d parameters (%d decayed tensors), lr %g",
        name,
        steps,
        sum(p.numel() for p in params),
        len(groups[0]["params"]),
        lr,
    )
    model.train()
    losses: list[float] = []
    for step in range(steps):
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            logger.info("%s step %d/%d: loss %.4f", name, step + 1, steps, sum(recent) / len(recent))
    model.eval()
    return losses
