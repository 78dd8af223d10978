"""Optimizer parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from iedp.config import OPTIMIZERS, TrainConfig
from iedp.models.tasks import TASKS

logger = logging.getLogger(__name__)


# Norm layers by type (BatchNorm and SyncBatchNorm derive from _NormBase).
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
GROUP_RULES = ("mmseg", "ldm")


def decays_by_rank(param: torch.Tensor) -> bool:
    """Weight decay by tensor rank (nanoGPT's rule): matrices and convolution kernels decay; vectors (biases, norm
    scales) and scalars do not."""
    return param.ndim >= 2


def _norm_params(modules: Iterable[nn.Module]) -> set[int]:
    return {
        id(p)
        for m in modules
        for sub in m.modules()
        if isinstance(sub, NORM_LAYERS)
        for p in sub.parameters()
    }


def _attention_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's transformer blocks (``attentions`` of its down, mid and up blocks): ldm's SpatialTransformers."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [
        attn for block in blocks if block is not None for attn in (getattr(block, "attentions", None) or [])
    ]


def parameter_groups(
    model: nn.Module,
    unet: nn.Module,
    lr: float,
    weight_decay: float,
    unet_lr_mult: float,
    rule: str = "ldm",
    heads: Sequence[nn.Module] = (),
) -> list[dict]:
    """AdamW groups as VPD's optimizer constructors make them; frozen parameters are left out.

    ``rule="ldm"`` (VPD depth, ``LDMOptimizerConstructor``): the UNet at ``lr × unet_lr_mult``, everything else at
    ``lr``; no weight decay on 1-D tensors and on tensors named ``*.bias``.

    ``rule="mmseg"`` (VPD segmentation, mmcv ``custom_keys={"unet": lr_mult 0.1, "norm": decay_mult 0}``): mmcv
    gives each parameter the longest key found in its name, ties going alphabetically, so "norm" beats "unet".
    In VPD's (ldm) names "norm" is found only in the UNet's transformer blocks (SpatialTransformer.norm,
    BasicTransformerBlock.norm1-3); its ResNet blocks call their GroupNorms ``in_layers.0``/``out_layers.0``
    and mmcv's ConvModule calls the heads' BatchNorms ``bn``. Hence: the UNet's transformer norm layers get the
    full lr and no decay, the rest of the UNet ``lr × unet_lr_mult`` with decay (biases and ResNet norms
    included), and the task ``heads`` full lr with decay (their norms included). Norm layers of any other
    trainable module (the adapter, the implicit query module) get no decay, as VPD's "norm" key would give them.

    Groups are found by membership (``unet.parameters()``, the UNet's ``attentions`` blocks, ``heads``) and layer
    type, not by parameter names, except the ``*.bias`` test of the ldm rule, which is VPD's own.
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"parameter group rule {rule!r} is not one of {', '.join(GROUP_RULES)}")
    unet_ids = {id(p) for p in unet.parameters()}
    attention_norms = _norm_params(_attention_blocks(unet))
    head_ids = {id(p) for head in heads for p in head.parameters()}
    other_norms = _norm_params([model]) - unet_ids - head_ids

    def group_of(name: str, p: nn.Parameter) -> tuple[str, float, float]:
        """(group name, lr multiplier, weight-decay multiplier) of one parameter."""
        in_unet = id(p) in unet_ids
        part, lr_mult = ("unet", unet_lr_mult) if in_unet else ("head", 1.0)
        if rule == "ldm":
            decay = decays_by_rank(p) and not name.endswith(".bias")  # VPD's models hold no 0-d parameters
        elif in_unet and id(p) in attention_norms:
            return "unet_attention_norm", 1.0, 0.0
        else:
            decay = id(p) not in other_norms
        return (part if decay else f"{part}_no_decay"), lr_mult, 1.0 if decay else 0.0

    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group_name, lr_mult, decay_mult = group_of(name, p)
        group = groups.setdefault(
            group_name,
            {
                "params": [],
                "lr": lr * lr_mult,
                "initial_lr": lr * lr_mult,
                "weight_decay": weight_decay * decay_mult,
                "name": group_name,
            },
        )
        group["params"].append(p)
    result = [groups[name] for name in sorted(groups)]
    for group in result:
        logger.info(
            "parameter group %s (%s rule): %d tensors, %d parameters, lr %.3g, weight decay %.3g",
            group["name"],
            rule,
            len(group["params"]),
            sum(p.numel() for p in group["params"]),
            group["lr"],
            group["weight_decay"],
        )
    return result


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    ``poly``: linear warm-up from ``warmup_ratio`` over ``warmup_steps``, then (1 - step/max_steps)^power decay from
    lr to ``min_lr`` (mmseg's PolyLR after LinearLR).

    ``rise_fall`` (VPD ``depth/train.py``): with s = step + 1 (VPD counts the batch being taken from 1), h =
    ``warmup_steps`` and p = ``rise_fall_power``, lr(s) = min + (lr - min)·(s/h)^p while s < h, then
    max(min, lr - (lr - min)·(s/h - 1)^p): back at ``min_lr`` after 2h steps and held there. With h = 0 there is
    no rise and the fall lasts ``max_steps``.
    """
    total, warmup, lr = config.max_steps, config.warmup_steps, config.lr
    floor = config.min_lr / lr if lr > 0 else 0.0
    if config.schedule == "poly":
        decay = floor + (1 - floor) * max(0.0, 1 - step / total) ** config.poly_power
        if step < warmup:
            ramp = config.warmup_ratio + (1 - config.warmup_ratio) * step / warmup
            return decay * ramp
        return decay
    power, s = config.rise_fall_power, step + 1
    if warmup <= 0:
        return max(floor, 1 - (1 - floor) * min(1.0, s / max(1, total)) ** power)
    if s < warmup:
        return floor + (1 - floor) * (s / warmup) ** power
    return max(floor, 1 - (1 - floor) * (s / warmup - 1) ** power)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer ``train.optimizer`` names: ``adamw`` (PyTorch's) or ``adamw8bit`` (bitsandbytes' AdamW with
    8-bit block-wise quantized moments: a quarter of AdamW's state memory; tensors under 4096 elements keep
    32-bit moments). Raises ImportError saying what to install when bitsandbytes is missing."""
    if name == "adamw":
        return torch.optim.AdamW
    if name != "adamw8bit":
        raise ValueError(f"train.optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            'train.optimizer=adamw8bit needs bitsandbytes: pip install "iedp[optim8bit]"'
        ) from None
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(
    model: nn.Module, unet: nn.Module, config: TrainConfig, task: str = "seg"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``config.optimizer`` (AdamW or its 8-bit form) over VPD's groups for ``task`` (seg: the mmseg rule, depth:
    the ldm rule) and the lr schedule.

    The task heads are the parts the model's task built (its ``head_parts``: FPN neck and head, or depth head)."""
    heads = [getattr(model, name) for name in getattr(model, "head_parts", ())]
    groups = parameter_groups(
        model,
        unet,
        config.lr,
        config.weight_decay,
        config.unet_lr_mult,
        rule=TASKS[task].param_rule,
        heads=heads,
    )
    optimizer = optimizer_class(config.optimizer)(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler
