"""Semantic FPN decode head (Kirillov et al. 2019; mmseg ``FPNHead``)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from iedp.config import ModelConfig
from iedp.models.heads.fpn import FPN
from iedp.models.heads.norm import build_norm


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    # No conv bias: the norm that follows has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        build_norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class FPNHead(nn.Module):
    """Per-pixel class logits from an FPN pyramid, at the finest level's stride.

    Each level is brought to ``strides[0]`` by ``log2(strides[i] / strides[0])`` steps of conv3x3-BN-ReLU and 2x
    bilinear upsampling (the finest level gets one conv and no upsampling); the levels are summed, then dropout
    and a 1x1 conv give the logits.

    Args:
        in_channels: channels of every input level (the FPN's ``out_channels``).
        strides: stride of each level relative to the image, fine to coarse, e.g. ``[8, 16, 32, 64]``; each
            must be ``strides[0]`` times a power of two.
        num_classes: number of output classes.
        channels: width of the per-level convs (128 in Semantic FPN).
        dropout: channel dropout probability before the classifier.

    Example (SD v1.5 at a 512 x 512 input)::

        >>> head = FPNHead(256, [8, 16, 32, 64], num_classes=150)
        >>> features = [torch.rand(1, 256, s, s) for s in (64, 32, 16, 8)]
        >>> tuple(head(features).shape)
        (1, 150, 64, 64)
    """

    def __init__(
        self,
        in_channels: int,
        strides: list[int],
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.1,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        self.norm = norm
        self.in_channels = in_channels
        self.strides = list(strides)
        self.num_classes = num_classes
        self.channels = channels
        self.scale_heads = nn.ModuleList(self._scale_head(stride) for stride in self.strides)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def _scale_head(self, stride: int) -> nn.Sequential:
        """conv-norm-ReLU (+ 2x upsample) repeated until ``stride`` reaches ``strides[0]``."""
        ratio = stride / self.strides[0]
        steps = round(math.log2(ratio)) if ratio >= 1 else -1
        if steps < 0 or 2**steps != ratio:
            raise ValueError(
                f"FPNHead: strides={self.strides}; each stride must be strides[0] times a power of two"
            )
        layers: list[nn.Module] = []
        for step in range(max(1, steps)):
            layers.append(
                _conv_norm_relu(self.in_channels if step == 0 else self.channels, self.channels, self.norm)
            )
            if steps > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        return nn.Sequential(*layers)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features[i]``: B x in_channels x H_i x W_i, fine to coarse -> logits B x num_classes x H_0 x W_0."""
        if len(features) != len(self.strides):
            raise ValueError(f"FPNHead: got {len(features)} feature maps, built for strides {self.strides}")
        fused = self.scale_heads[0](features[0])  # B x channels x H_0 x W_0
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            # Resize covers sizes that are not exact powers of two of H_0 (odd input sizes).
            fused = fused + F.interpolate(
                head(x), size=fused.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.classifier(self.dropout(fused))


def build_segmentation_head(
    config: ModelConfig, strides: list[int], in_channels: list[int], num_classes: int
) -> dict[str, nn.Module]:
    """The segmentation head of the task table: FPN neck, then the Semantic-FPN head (DESIGN §1.7)."""
    neck = FPN(in_channels, config.neck_channels)
    head = FPNHead(
        config.neck_channels,
        strides,
        num_classes,
        channels=config.head_channels,
        dropout=config.dropout,
        norm=config.head_norm,
    )
    return {"neck": neck, "head": head}
