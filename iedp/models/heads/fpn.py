"""FPN neck: lateral 1x1 convs, a top-down pathway and 3x3 output convs (Lin et al. 2017; mmseg ``FPN``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Feature pyramid network over a list of feature maps ordered fine to coarse.

    Each level gets a 1x1 lateral conv to ``out_channels``; from the coarsest level down, the coarser result is
    upsampled (nearest neighbour) to the finer size and added; a 3x3 conv then smooths each sum.

    Args:
        in_channels: channels of each input level, fine to coarse, e.g. ``[320, 640 + C, 1280 + C, 1280]``.
        out_channels: channels of every output level (256 in Semantic FPN).

    Example (SD v1.5 at a 512 x 512 input, C = 150 class maps)::

        >>> neck = FPN([320, 790, 1430, 1280], 256)
        >>> sizes = [64, 32, 16, 8]
        >>> features = [torch.rand(1, c, s, s) for c, s in zip(neck.in_channels, sizes)]
        >>> [tuple(f.shape) for f in neck(features)]
        [(1, 256, 64, 64), (1, 256, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8)]
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("FPN: in_channels is empty; expected one channel count per feature level")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """``features[i]``: B x in_channels[i] x H_i x W_i, fine to coarse -> B x out_channels x H_i x W_i each."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPN: got {len(features)} feature maps, built for {len(self.in_channels)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        # Top-down: each level receives the (already accumulated) next-coarser one.
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + F.interpolate(
                laterals[level], size=finer.shape[-2:], mode="nearest"
            )
        return [conv(x) for conv, x in zip(self.output_convs, laterals, strict=True)]
