"""Test-time inference protocols: sliding windows, flips and scales (DESIGN §3).

Each function takes ``predict``, a callable from an image batch (B, 3, h, w) with h, w multiples of the model's
input multiple to per-pixel outputs (B, K, h, w), so the same code serves segmentation logits and depth maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Predict = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``size`` (mmseg's grid: the last window is moved back to end at the edge)."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def predict_padded(predict: Predict, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right with 0 (the padding value of training crops) to a multiple, predict, crop back."""
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
    return predict(images)[..., :h, :w]


def sliding_window(
    predict: Predict, image: torch.Tensor, window: int, stride: int, multiple: int, batch_size: int = 4
) -> torch.Tensor:
    """Average of window predictions over a (1, 3, H, W) image -> (1, K, H, W); overlaps are averaged."""
    _, _, H, W = image.shape
    boxes = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    crops = torch.cat([image[..., y : y + window, x : x + window] for y, x in boxes])
    outputs = torch.cat([predict_padded(predict, chunk, multiple) for chunk in crops.split(batch_size)])
    total = image.new_zeros((1, outputs.shape[1], H, W), dtype=outputs.dtype)
    count = image.new_zeros((1, 1, H, W), dtype=outputs.dtype)
    for (y, x), out in zip(boxes, outputs, strict=True):
        total[0, :, y : y + window, x : x + window] += out
        count[..., y : y + window, x : x + window] += 1
    return total / count


def with_flip(predict_image: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Mean of the prediction and the un-flipped prediction of the horizontally flipped image."""
    return (predict_image(image) + predict_image(image.flip(-1)).flip(-1)) / 2


def segment(
    predict: Predict,
    image: torch.Tensor,
    out_size: tuple[int, int],
    window: int,
    stride: int,
    multiple: int,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    batch_size: int = 4,
) -> torch.Tensor:
    """Class scores (1, K, *out_size) of a (1, 3, H, W) image already resized to the base scale.

    Single scale without flip returns logits (mmseg's whole-image path); with several scales or flips it returns
    mmseg's aug_test: each (scale, flip) view's logits (windows averaged, resized to ``out_size``) go through their
    own softmax, and the probabilities are averaged over all views. Either way argmax gives the label map.
    """
    H, W = image.shape[-2:]

    def view(scale: float, flipped: bool) -> torch.Tensor:
        size = (round(H * scale), round(W * scale))
        scaled = (
            image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        )
        if flipped:
            scaled = scaled.flip(-1)
        logits = sliding_window(predict, scaled, window, stride, multiple, batch_size)
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.flip(-1) if flipped else logits

    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    if len(views) == 1:
        return view(*views[0])
    return torch.stack([view(s, f).softmax(dim=1) for s, f in views]).mean(dim=0)


def estimate_depth(
    predict: Predict,
    image: torch.Tensor,
    window: int,
    stride: int,
    multiple: int,
    flip: bool = True,
    batch_size: int = 4,
) -> torch.Tensor:
    """Depth (1, 1, H, W) of a (1, 3, H, W) frame: windows (480 wide at x = 0 and 160 for NYUv2's 640) and flips."""

    def slide(x: torch.Tensor) -> torch.Tensor:
        return sliding_window(predict, x, window, stride, multiple, batch_size)

    return with_flip(slide, image) if flip else slide(image)
