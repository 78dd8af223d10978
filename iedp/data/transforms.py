"""The paper's augmentations (DESIGN §2), deterministic given a ``numpy.random.Generator``.

Images travel through the pipelines as float32 H×W×3 arrays in [0, 255] (no uint8 rounding
between photometric steps), labels as uint8 H×W and depth as float32 H×W metres. Each pipeline
ends with :func:`normalize` (x / 127.5 - 1, the range the SD VAE expects) and bottom/right
padding, and returns torch tensors.

Segmentation follows mmsegmentation's ADE20K recipe: ``Resize(img_scale=(2048, 512),
ratio_range=(0.5, 2.0), keep_ratio=True)``, ``RandomCrop(512, cat_max_ratio=0.75)``,
``RandomFlip(0.5)``, ``PhotoMetricDistortion``, normalise, ``Pad(512, pad_val=0, seg_pad_val=255)``.
Resizing uses ``torch.nn.functional.interpolate`` (bilinear with antialiasing for images, nearest
for labels) instead of OpenCV.

Depth follows GLPDepth/VPD (albumentations defaults): CutDepth (optional), flip, random crop,
brightness/contrast, gamma, hue/saturation/value; see :class:`DepthTrainTransform` for the values.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iedp.data.images import IGNORE_INDEX

# ----------------------------------------------------------------------------- geometry


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Largest size that keeps the aspect ratio and fits ``scale`` = (long edge, short edge).

    The rule of ``mmcv.rescale_size``: factor = min(long / max(h, w), short / min(h, w)), sizes
    rounded half up. For ADE20K's (2048, 512) it sets the short side to 512 unless the image is
    more than 4:1.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of an H×W×C image to ``size`` = (h, w); returns float32."""
    if image.shape[:2] == tuple(size):
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).clamp_(0.0, 255.0).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H×W label map (floor(dst × scale), as OpenCV's INTER_NEAREST)."""
    if label.shape == tuple(size):
        return label
    tensor = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].numpy()


def random_rescale(
    image: np.ndarray,
    label: np.ndarray,
    base_scale: tuple[int, int],
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``Resize(img_scale=base_scale, ratio_range=..., keep_ratio=True)``.

    A ratio r ~ U(ratio_range) scales the base to (int(long × r), int(short × r)) and the image
    is rescaled to fit it with its aspect ratio kept.
    """
    ratio = rng.uniform(*ratio_range)
    scale = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
    size = rescale_size(*image.shape[:2], scale)
    return resize_image(image, size), resize_label(label, size)


def _crop_box(
    shape: tuple[int, ...], crop_size: tuple[int, int], rng: np.random.Generator
) -> tuple[slice, slice]:
    margin_h = max(shape[0] - crop_size[0], 0)
    margin_w = max(shape[1] - crop_size[1], 0)
    top = int(rng.integers(0, margin_h + 1))
    left = int(rng.integers(0, margin_w + 1))
    return slice(top, top + crop_size[0]), slice(left, left + crop_size[1])


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a crop of at most ``crop_size`` in which no class covers ``cat_max_ratio``.

    As in mmseg a crop is accepted when it holds at least two labelled classes and the largest
    has a share below ``cat_max_ratio``; after 10 rejected draws the next draw is taken as is.
    ``cat_max_ratio >= 1`` disables the check. Images smaller than the crop are kept whole.
    """
    box = _crop_box(image.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = np.unique(label[box], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(image.shape, crop_size, rng)
    return image[box], label[box]


def random_flip(
    image: np.ndarray, target: np.ndarray, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip image and its label or depth map left-right together with probability ``prob``."""
    if rng.random() < prob:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(target[:, ::-1])
    return image, target


# ----------------------------------------------------------------------------- colour


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] to HSV with hue in degrees [0, 360), saturation in [0, 1], value in [0, 255]."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value = image.max(axis=-1)
    chroma = value - image.min(axis=-1)
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(
        value == red,
        (green - blue) / safe_chroma,
        np.where(value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma),
    )
    hue = np.where(chroma > 0, (hue * 60.0) % 360.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    sector = hue / 60.0
    index = np.floor(sector).astype(np.int64) % 6
    frac = sector - np.floor(sector)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    choices_r = np.stack([value, q, p, p, t, value])
    choices_g = np.stack([t, value, value, q, p, p])
    choices_b = np.stack([p, p, t, value, value, q])
    pick = index[None]
    rgb = [np.take_along_axis(c, pick, axis=0)[0] for c in (choices_r, choices_g, choices_b)]
    return np.stack(rgb, axis=-1).astype(np.float32)


def _affine(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(image * alpha + beta, 0.0, 255.0).astype(np.float32)


def _shift_hsv(
    image: np.ndarray,
    hue_degrees: float,
    saturation_scale: float,
    saturation_shift: float,
    value_shift: float,
) -> np.ndarray:
    hsv = rgb_to_hsv(image)
    hsv[..., 0] = (hsv[..., 0] + hue_degrees) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation_scale + saturation_shift, 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + value_shift, 0.0, 255.0)
    return np.clip(hsv_to_rgb(hsv), 0.0, 255.0)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``; each step applied with probability 0.5.

    Order: brightness (+U(-32, 32)), contrast (×U(0.5, 1.5)) either now or last (coin flip),
    saturation (×U(0.5, 1.5)), hue (+k × 2° with integer k in [-18, 18], i.e. OpenCV hue
    units), then contrast if not done yet. Unlike mmseg, intermediate results stay float.
    """
    if rng.integers(2):
        image = _affine(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = bool(rng.integers(2))
    if not contrast_last and rng.integers(2):
        image = _affine(image, alpha=rng.uniform(*contrast_range))
    saturation_scale = rng.uniform(*saturation_range) if rng.integers(2) else 1.0
    hue_degrees = 2.0 * int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else 0.0
    if saturation_scale != 1.0 or hue_degrees != 0.0:
        image = _shift_hsv(image, hue_degrees, saturation_scale, 0.0, 0.0)
    if contrast_last and rng.integers(2):
        image = _affine(image, alpha=rng.uniform(*contrast_range))
    return image


CUTDEPTH_PROB = 0.25  # VPD: CutDepth on one sample in four


def cut_depth(
    image: np.ndarray, depth: np.ndarray, rng: np.random.Generator, max_width: float = 0.75
) -> np.ndarray:
    """CutDepth as VPD (GLPDepth's ``augment_training_data``): a vertical strip of the image becomes the depth map.

    With alpha, beta ~ U(0, 1) the strip starts at column ``int(alpha × W)`` and is
    ``int(max((W - alpha × W) × beta × max_width, 1))`` wide. VPD writes the depth in millimetres into its uint8
    image, which keeps the millimetres modulo 256 (NumPy's cast on x86); so does this function, on all three
    channels: the strip shows depth as a sawtooth of period 25.6 cm. Returns a new float32 image.
    """
    width = image.shape[1]
    alpha, beta = rng.random(), rng.random()
    left = int(alpha * width)
    strip = int(max((width - alpha * width) * beta * max_width, 1))
    millimetres = np.round(depth[:, left : left + strip].astype(np.float64) * 1000.0)
    image = image.astype(np.float32, copy=True)
    image[:, left : left + strip] = (millimetres % 256).astype(np.float32)[..., None]
    return image


# ----------------------------------------------------------------------------- tensors


def normalize(image: np.ndarray) -> torch.Tensor:
    """H×W×3 in [0, 255] to a float32 3×H×W tensor in [-1, 1] (x / 127.5 - 1)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def pad_to(tensor: torch.Tensor, size: tuple[int, int], value: float) -> torch.Tensor:
    """Pad the last two dims at the bottom and right up to ``size`` (as mmseg ``Pad``)."""
    height, width = tensor.shape[-2:]
    pad_h, pad_w = size[0] - height, size[1] - width
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad {height}x{width} to the smaller size {size[0]}x{size[1]}")
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=value)


def round_up(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Each side rounded up to a multiple (480 → 512 for 64)."""
    return (math.ceil(size[0] / multiple) * multiple, math.ceil(size[1] / multiple) * multiple)


# ----------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class SegTrainTransform:
    """Segmentation training pipeline (mmseg ADE20K recipe, DESIGN §2).

    Returns the image as float32 3×crop in [-1, 1] (padding 0) and the label as int64 crop-sized
    H×W (padding ``ignore_index``).
    """

    crop_size: tuple[int, int] = (512, 512)
    base_scale: tuple[int, int] = (2048, 512)  # (long edge, short edge) before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    ignore_index: int = IGNORE_INDEX

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = random_rescale(image, label, self.base_scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio, rng, self.ignore_index)
        image, label = random_flip(image, label, self.flip_prob, rng)
        image = photometric_distortion(image, rng)
        image_tensor = pad_to(normalize(image), self.crop_size, 0.0)
        label_tensor = pad_to(
            torch.from_numpy(np.ascontiguousarray(label)), self.crop_size, self.ignore_index
        )
        return image_tensor, label_tensor.long()


def seg_val_transform(
    image: np.ndarray, label: np.ndarray, scale: tuple[int, int] = (2048, 512)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation evaluation: image rescaled into ``scale`` (short side 512 for ADE20K), label untouched.

    Metrics are computed at the original resolution, so the label keeps its size and the model's
    logits are resized back to it.
    """
    size = rescale_size(*image.shape[:2], scale)
    return normalize(resize_image(image, size)), torch.from_numpy(np.ascontiguousarray(label)).long()


@dataclass(frozen=True)
class DepthTrainTransform:
    """Depth training pipeline after GLPDepth / VPD (albumentations defaults), each step p=0.5.

    - horizontal flip;
    - random crop to ``crop_size`` (480×480 from NYUv2's 480×640; smaller frames are kept whole);
    - brightness/contrast: x × (1 + U(-0.2, 0.2)) + 255 × U(-0.2, 0.2);
    - gamma: 255 × (x / 255) ^ U(0.8, 1.2);
    - hue/saturation/value: hue + U(-20, 20) OpenCV units (×2°), saturation + U(-30, 30) / 255,
      value + U(-20, 20);

    and, before all of them, on the full frame as VPD does, :func:`cut_depth` with probability ``cutdepth_prob``
    (VPD: 0.25, off by default here; the recipes switch it on with ``data.cutdepth``). VPD applies it to every
    fourth sample a loader worker draws, a count that depends on the number of workers; here each sample decides
    with its own seeded draw, at the same rate.

    The result is padded at the bottom/right to ``crop_size`` rounded up to ``pad_multiple``
    (480 → 512), image with 0 and depth with 0 (= invalid). Depth values are never rescaled.
    """

    crop_size: tuple[int, int] = (480, 480)
    pad_multiple: int = 64
    flip_prob: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    gamma_range: tuple[float, float] = (0.8, 1.2)
    hue_shift_limit: float = 20.0  # OpenCV hue units (2° each)
    saturation_shift_limit: float = 30.0  # on a 0..255 scale
    value_shift_limit: float = 20.0  # on a 0..255 scale
    cutdepth_prob: float = 0.0  # share of samples given CutDepth (VPD: one in four)
    cutdepth_max_width: float = 0.75  # VPD's p: the strip's most share of the columns right of its start

    def __call__(
        self, image: np.ndarray, depth: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.astype(np.float32, copy=False)
        # no draw when off: the random streams stay as they were
        if self.cutdepth_prob > 0 and rng.random() < self.cutdepth_prob:
            image = cut_depth(image, depth, rng, self.cutdepth_max_width)
        image, depth = random_flip(image, depth, self.flip_prob, rng)
        box = _crop_box(image.shape, self.crop_size, rng)
        image, depth = image[box], depth[box]
        if rng.random() < 0.5:
            alpha = 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit)
            beta = 255.0 * rng.uniform(-self.brightness_limit, self.brightness_limit)
            image = _affine(image, alpha, beta)
        if rng.random() < 0.5:
            image = (255.0 * (image / 255.0) ** rng.uniform(*self.gamma_range)).astype(np.float32)
        if rng.random() < 0.5:
            image = _shift_hsv(
                image,
                hue_degrees=2.0 * rng.uniform(-self.hue_shift_limit, self.hue_shift_limit),
                saturation_scale=1.0,
                saturation_shift=rng.uniform(-self.saturation_shift_limit, self.saturation_shift_limit)
                / 255.0,
                value_shift=rng.uniform(-self.value_shift_limit, self.value_shift_limit),
            )
        padded = round_up(self.crop_size, self.pad_multiple)
        image_tensor = pad_to(normalize(image), padded, 0.0)
        depth_tensor = pad_to(
            torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None], padded, 0.0
        )
        return image_tensor, depth_tensor


def depth_test_transform(image: np.ndarray, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth evaluation: the full frame as given, normalised, unpadded; depth as 1×H×W metres."""
    return normalize(image), torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
