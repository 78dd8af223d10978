"""Task losses: scale-invariant log loss for depth, cross-entropy for segmentation (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def silog_loss(
    pred: Tensor,
    gt: Tensor,
    valid_mask: Tensor | None = None,
    variance_focus: float = 0.5,
    eps: float = 1e-12,
) -> Tensor:
    """Scale-invariant log loss ``sqrt(mean(d^2) - variance_focus * mean(d)^2)``, ``d = ln gt - ln pred``.

    The means run over all valid pixels of the whole batch at once (as VPD), not per image.

    Args:
        pred: predicted depth, B x 1 x H x W (any shape matching ``gt``), positive.
        gt: ground-truth depth, same shape; pixels with ``gt <= 0`` have no depth and are always left out.
        valid_mask: optional boolean mask of the same shape, further restricting the valid pixels.
        variance_focus: weight of the squared mean (0.5 here; 1 makes the loss fully scale invariant).
        eps: floor of the term under the square root, whose gradient is infinite at 0 (e.g. when pred == gt).

    Returns:
        A scalar; 0 (still attached to ``pred``'s graph) when no pixel is valid.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"silog_loss: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
    valid = gt > 0
    if valid_mask is not None:
        valid = valid & valid_mask.bool()
    if not valid.any():
        return pred.sum() * 0
    d = torch.log(gt[valid]) - torch.log(pred[valid])  # N valid pixels
    return torch.sqrt((d.square().mean() - variance_focus * d.mean().square()).clamp(min=eps))


def segmentation_loss(
    logits: Tensor, label: Tensor, ignore_index: int = 255, avg_non_ignore: bool = False
) -> Tensor:
    """Pixel-wise cross-entropy as mmseg's ``CrossEntropyLoss`` (VPD's loss): summed over the labelled pixels
    (those not equal to ``ignore_index``) and divided by *all* pixels of the batch, ignored ones included.

    Args:
        logits: B x C x h x w; resized bilinearly (align_corners=False) to the label size when it differs.
        label: B x H x W integer class ids in [0, C), or ``ignore_index``.
        ignore_index: label value that contributes nothing.
        avg_non_ignore: divide by the labelled pixels instead (mmseg's option of the same name; PyTorch's mean).

    Returns:
        A scalar; 0 (still attached to ``logits``' graph) when every pixel is ignored.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    labelled = label != ignore_index
    if not labelled.any():
        return logits.sum() * 0
    pixel_losses = F.cross_entropy(logits, label.long(), ignore_index=ignore_index, reduction="none")
    return pixel_losses.sum() / (labelled.sum() if avg_non_ignore else label.numel())
