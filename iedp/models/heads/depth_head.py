"""VPD's monocular depth decoder: fuse the UNet pyramid at stride 32, then deconvolve back to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iedp.config import ModelConfig
from iedp.models.heads.norm import build_norm


class DepthHead(nn.Module):
    """Metric depth B x 1 x H x W in (0, max_depth) from four feature maps at strides 8, 16, 32, 64.

    Fusion at the third level's resolution (stride 32): level 0 -> conv3x3 s2, GN, ReLU, conv3x3 s2; level 1 ->
    conv3x3 s2; level 3 -> 2x nearest upsample; concatenated with level 2, then 1x1 conv to ``fuse_channels``,
    GN, ReLU. Decoder: ``num_deconv`` x (transposed conv k2 s2 to ``deconv_channels``, BN, ReLU), conv3x3 to
    ``head_channels``, BN, ReLU, two 2x bilinear upsamples, conv3x3-ReLU-conv3x3 to one channel, then
    ``sigmoid * max_depth``. The output is ``2 ** (num_deconv + 2)`` times the fused size: with the default 3,
    stride 32 -> 1, the input resolution.

    Args:
        in_channels: channels of the four levels, fine to coarse (SD v1.5: ``[320, 640, 1280, 1280]``).
        max_depth: the largest predictable depth in metres (10 for NYUv2).
        fuse_channels: width after fusion (1536 in VPD).
        deconv_channels: width of each transposed conv (32 in VPD).
        num_deconv: number of 2x transposed-conv steps (3 in VPD).
        head_channels: width of the final convs (192 in VPD).

    Example (SD v1.5 at a 512 x 512 input)::

        >>> head = DepthHead([320, 640, 1280, 1280])
        >>> features = [torch.rand(1, c, s, s) for c, s in zip(head.in_channels, (64, 32, 16, 8))]
        >>> tuple(head(features).shape)
        (1, 1, 512, 512)
    """

    def __init__(
        self,
        in_channels: list[int],
        max_depth: float = 10.0,
        fuse_channels: int = 1536,
        deconv_channels: int = 32,
        num_deconv: int = 3,
        head_channels: int = 192,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(
                f"DepthHead: in_channels={list(in_channels)}; expected four levels (strides 8..64)"
            )
        if num_deconv < 1:
            raise ValueError(f"DepthHead: num_deconv={num_deconv}; expected at least 1")
        self.in_channels = list(in_channels)
        self.max_depth = max_depth
        c0, c1, c2, c3 = self.in_channels
        self.reduce0 = nn.Sequential(  # stride 8 -> 32
            nn.Conv2d(c0, c0, kernel_size=3, stride=2, padding=1),
            build_norm("gn", c0),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, kernel_size=3, stride=2, padding=1),
        )
        self.reduce1 = nn.Conv2d(c1, c1, kernel_size=3, stride=2, padding=1)  # stride 16 -> 32
        self.fuse = nn.Sequential(
            nn.Conv2d(c0 + c1 + c2 + c3, fuse_channels, kernel_size=1),
            build_norm("gn", fuse_channels),
            nn.ReLU(inplace=True),
        )
        deconvs: list[nn.Module] = []
        for step in range(num_deconv):
            deconvs += [
                nn.ConvTranspose2d(
                    fuse_channels if step == 0 else deconv_channels,
                    deconv_channels,
                    kernel_size=2,
                    stride=2,
                    bias=False,
                ),
                build_norm(norm, deconv_channels),
                nn.ReLU(inplace=True),
            ]
        self.decoder = nn.Sequential(
            *deconvs,
            nn.Conv2d(deconv_channels, head_channels, kernel_size=3, padding=1, bias=False),
            build_norm(norm, head_channels),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
        self.predict = nn.Sequential(
            nn.Conv2d(head_channels, head_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, kernel_size=3, padding=1),
        )
        self.init_weights()

    def init_weights(self) -> None:
        """VPD's initialisation (depth/models_depth/model.py): the fusion convs (VPDDepthEncoder) truncated normal,
        std 0.02; the decoder's convs and transposed convs and the final convs normal, std 0.001; biases 0; norm
        layers weight 1, bias 0."""
        for module in (self.reduce0, self.reduce1, self.fuse):
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.trunc_normal_(conv.weight, std=0.02, a=-2.0, b=2.0)  # timm's bounds: ±2, not ±2σ
                    nn.init.zeros_(conv.bias)
        for module in (*self.decoder.modules(), *self.predict.modules()):
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features``: four maps B x in_channels[i] x H_i x W_i, fine to coarse, with H_2 x W_2 the fused size.

        Returns:
            depth B x 1 x (H_2 * 2 ** (num_deconv + 2)) x (W_2 * ...), in metres, in (0, max_depth).
        """
        if len(features) != 4:
            raise ValueError(f"DepthHead: got {len(features)} feature maps; expected four (strides 8..64)")
        level0, level1, level2, level3 = features
        size = level2.shape[-2:]
        reduced0, reduced1 = self.reduce0(level0), self.reduce1(level1)
        if reduced0.shape[-2:] != size or reduced1.shape[-2:] != size:
            raise ValueError(
                f"DepthHead: levels 0/1 reduce to {tuple(reduced0.shape[-2:])}/{tuple(reduced1.shape[-2:])}, "
                f"level 2 is {tuple(size)}; expected strides 8, 16, 32, 64"
            )
        upsampled3 = F.interpolate(level3, size=size, mode="nearest")
        fused = self.fuse(torch.cat([reduced0, reduced1, level2, upsampled3], dim=1))  # B x fuse x H_2 x W_2
        decoded = self.decoder(fused)  # B x head_channels x H x W
        return torch.sigmoid(self.predict(decoded)) * self.max_depth  # B x 1 x H x W


def build_depth_head(
    config: ModelConfig, strides: list[int], in_channels: list[int], num_classes: int
) -> dict[str, nn.Module]:
    """The depth head of the task table (DESIGN §1.7); the strides and scene count do not change it."""
    head = DepthHead(
        in_channels,
        max_depth=config.max_depth,
        deconv_channels=config.depth_deconv_channels,
        fuse_channels=config.depth_fuse_channels,
        head_channels=config.depth_head_channels,
        norm=config.head_norm,
    )
    return {"head": head}
