"""Normalisation layers of the heads, chosen by name."""

from __future__ import annotations

import math

from torch import nn

NORMS = ("bn", "gn")


def build_norm(kind: str, channels: int) -> nn.Module:
    """``bn``: BatchNorm (SyncBatchNorm once converted for multi-GPU training); ``gn``: GroupNorm with 16 groups
    (VPD's choice; the gcd keeps widths that are not multiples of 16 valid), independent of the batch split."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(16, channels), channels)
    raise ValueError(f"model.head_norm: {kind!r} is not one of {', '.join(NORMS)}")
