"""Shapes of the FPN neck and the segmentation/depth heads, and the losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from iedp.models.heads.depth_head import DepthHead
from iedp.models.heads.fpn import FPN
from iedp.models.heads.fpn_head import FPNHead
from iedp.models.losses import segmentation_loss, silog_loss

# The UNet decoder pyramid of a 512 x 512 image: strides 8, 16, 32, 64 of the image.
SIZES = (64, 32, 16, 8)
STRIDES = [8, 16, 32, 64]
NUM_CLASSES = 150
CHANNEL_LISTS = {
    "tiny": [32, 32, 64, 64],
    "sd": [320, 640, 1280, 1280],
    # With the cross-attention class maps appended at 32 x 32 and 16 x 16.
    "sd+maps": [320, 640 + NUM_CLASSES, 1280 + NUM_CLASSES, 1280],
}


def _pyramid(channels: list[int], batch: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch, c, s, s, generator=generator) for c, s in zip(channels, SIZES, strict=True)]


@pytest.mark.parametrize("name", CHANNEL_LISTS)
def test_fpn_and_head_shapes(name: str) -> None:
    channels = CHANNEL_LISTS[name]
    neck = FPN(channels, out_channels=64)
    head = FPNHead(neck.out_channels, STRIDES, num_classes=NUM_CLASSES, channels=32).eval()
    with torch.no_grad():
        features = neck(_pyramid(channels, batch=2))
        logits = head(features)
    assert [tuple(f.shape) for f in features] == [(2, 64, s, s) for s in SIZES]
    assert tuple(logits.shape) == (2, NUM_CLASSES, 64, 64)


def test_fpn_head_upsampling_steps_follow_strides() -> None:
    head = FPNHead(16, STRIDES, num_classes=3, channels=8)
    upsamples = [sum(isinstance(m, torch.nn.Upsample) for m in scale_head) for scale_head in head.scale_heads]
    assert upsamples == [0, 1, 2, 3]


def test_fpn_head_rejects_strides_that_are_not_power_of_two_multiples() -> None:
    with pytest.raises(ValueError, match="strides"):
        FPNHead(16, [8, 24], num_classes=3)


@pytest.mark.parametrize("name", ["tiny", "sd"])
def test_depth_head_shape_and_range(name: str) -> None:
    channels = CHANNEL_LISTS[name]
    # The SD widths with VPD's defaults; the tiny preset passes small ones.
    widths = {} if name == "sd" else {"fuse_channels": 48, "deconv_channels": 8, "head_channels": 16}
    head = DepthHead(channels, max_depth=10.0, **widths).eval()
    with torch.no_grad():
        depth = head(_pyramid(channels))
    assert tuple(depth.shape) == (1, 1, 512, 512)
    assert depth.min() > 0 and depth.max() < 10.0


def test_depth_head_output_scales_with_num_deconv() -> None:
    channels = CHANNEL_LISTS["tiny"]
    head = DepthHead(channels, fuse_channels=16, deconv_channels=8, num_deconv=2, head_channels=8).eval()
    features = [torch.rand(1, c, s // 4, s // 4) for c, s in zip(channels, SIZES, strict=True)]
    with torch.no_grad():
        assert tuple(head(features).shape) == (1, 1, 64, 64)  # fused 4 x 4, times 2 ** (2 + 2)


def test_silog_loss_hand_computed() -> None:
    pred = torch.tensor([[1.0, 2.0], [4.0, 1.0]])
    gt = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # the zero has no depth and is left out
    # d = ln gt - ln pred = [0, -ln 2, -ln 2]: mean(d^2) = 2/3 ln^2 2, mean(d)^2 = 4/9 ln^2 2,
    # so L = sqrt(2/3 - 0.5 * 4/9) ln 2 = 2/3 ln 2.
    assert silog_loss(pred, gt).item() == pytest.approx(2 / 3 * math.log(2), rel=1e-6)


def test_silog_loss_valid_mask_restricts_pixels() -> None:
    pred = torch.tensor([[1.0, 2.0], [4.0, 1.0]])
    gt = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert silog_loss(pred, gt, mask).item() == pytest.approx(2 / 3 * math.log(2), rel=1e-6)


def test_silog_loss_zero_and_finite_gradient_when_pred_equals_gt() -> None:
    gt = torch.rand(2, 1, 4, 4) + 0.5
    pred = gt.clone().requires_grad_(True)
    loss = silog_loss(pred, gt)
    loss.backward()
    assert loss.item() < 1e-5
    assert torch.isfinite(pred.grad).all()


def test_silog_loss_gradient_flows() -> None:
    gt = torch.rand(2, 1, 4, 4) + 0.5
    pred = (torch.rand(2, 1, 4, 4) + 0.5).requires_grad_(True)
    silog_loss(pred, gt).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_silog_loss_without_valid_pixels_is_zero_with_grad() -> None:
    pred = torch.rand(1, 1, 2, 2).requires_grad_(True)
    loss = silog_loss(pred, torch.zeros(1, 1, 2, 2))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_segmentation_loss_ignores_255() -> None:
    logits = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    label = torch.full((2, 3, 3), 255)
    label[1, 2, 0] = 3
    one_pixel = -F.log_softmax(logits[1, :, 2, 0], dim=0)[3]
    # mmseg (avg_non_ignore=False, VPD): the one labelled pixel's loss over all 18 pixels of the batch
    assert segmentation_loss(logits, label).item() == pytest.approx(one_pixel.item() / 18, rel=1e-6)
    assert segmentation_loss(logits, label, avg_non_ignore=True).item() == pytest.approx(
        one_pixel.item(), rel=1e-6
    )


def test_segmentation_loss_resizes_logits_to_label() -> None:
    logits = torch.randn(1, 4, 4, 4)
    label = torch.randint(0, 4, (1, 8, 8))
    resized = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert segmentation_loss(logits, label).item() == pytest.approx(F.cross_entropy(resized, label).item())


def test_segmentation_loss_all_ignored_is_zero_with_grad() -> None:
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
