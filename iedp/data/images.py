"""Readers for images, label maps and depth maps that fail with one clear line per bad file.

Every reader decodes the whole file (PIL's ``load``), so a truncated or corrupt file is reported
when it is read, naming the file, instead of surfacing later as a shape error or a silently
grey image. All problems raise :class:`~iedp.errors.InputError`.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from iedp.errors import InputError

IGNORE_INDEX = 255
"""Label value that marks pixels excluded from loss and metrics."""

_DEPTH_SCALE = 1000.0
"""Depth PNGs store millimetres: metres = value / 1000."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


MAX_PIXELS_CAP = 40_000_000
"""The default pixel limit on a machine with ample memory: 40 megapixels, above any phone's default photo."""
BYTES_PER_PIXEL = 400
"""Peak memory per input pixel of reading and predicting one image (decoded RGB, float copies, resized scores)."""


def default_max_pixels() -> int:
    """The pixel limit that fits this machine: its available memory / BYTES_PER_PIXEL, at most MAX_PIXELS_CAP
    and at least 1 megapixel."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not Linux: no estimate
        return MAX_PIXELS_CAP
    return max(1_000_000, min(MAX_PIXELS_CAP, available // BYTES_PER_PIXEL))


def max_pixels() -> int:
    """Largest image accepted (width × height), ``$IEDP_MAX_PIXELS`` or :func:`default_max_pixels`: a guard
    against decompression bombs and images this machine cannot process, checked from the header before anything
    is decoded."""
    value = os.environ.get("IEDP_MAX_PIXELS")
    if value is None:
        return default_max_pixels()
    try:
        return int(value)
    except ValueError:
        raise InputError(f"IEDP_MAX_PIXELS: {value!r} is not an integer number of pixels") from None


def _open_decoded(path: str | Path) -> tuple[Image.Image, str | None]:
    """Open and fully decode ``path``: the image, turned upright by its EXIF orientation tag, and its file format.

    PIL's lazy ``open`` alone would not notice a truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    limit = max_pixels()
    try:
        with Image.open(path) as img:
            if img.width * img.height > limit:
                raise InputError(
                    f"{path}: image is {img.width}x{img.height} = {img.width * img.height} pixels, above the limit "
                    f"of {limit} (set IEDP_MAX_PIXELS={img.width * img.height} to allow it if the file is trusted and memory "
                    f"suffices: about {BYTES_PER_PIXEL} bytes per pixel)"
                )
            img.load()
            # EXIF orientation (phone photos are stored sideways with a rotate tag), as viewers and OpenCV apply it
            return ImageOps.exif_transpose(img), img.format
    # the pixel limit above: already one line naming the file (an InputError is a ValueError)
    except InputError:
        raise
    except _DECODE_ERRORS as err:
        raise InputError(f"{path}: cannot decode image ({err})") from err


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as uint8 H×W×3 RGB; grayscale, palette, RGBA and CMYK files are converted."""
    img, _ = _open_decoded(path)
    if img.mode in ("I;16", "I", "F"):
        raise InputError(f"{path}: not a colour image (mode {img.mode}, looks like a depth or label map)")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL wants palette transparency resolved through RGBA first
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: str | Path, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """Read an 8-bit PNG label map as uint8 H×W class indices with 255 = ignore.

    With ``reduce_zero_label`` (the ADE20K convention) raw 0 ("other") becomes 255 and raw v
    becomes v - 1, so stored values 1..num_classes map to 0..num_classes-1. Any other value except
    255 is an error naming the file, the value and the allowed range: a wrong ``num_classes`` or
    a prediction saved in the wrong convention must not be scored silently.
    """
    img, _ = _open_decoded(path)
    if img.mode not in ("L", "P"):
        raise InputError(f"{path}: not an 8-bit label map (PNG mode {img.mode}, expected L or P)")
    raw = np.asarray(img, dtype=np.uint8)
    if reduce_zero_label:
        low, high = 0, num_classes
        label = raw.astype(np.int16) - 1
        label[raw == 0] = IGNORE_INDEX
        label[raw == IGNORE_INDEX] = IGNORE_INDEX
    else:
        low, high = 0, num_classes - 1
        label = raw.astype(np.int16)
    bad = (raw > high) & (raw != IGNORE_INDEX)
    if bad.any():
        value = int(raw[bad][0])
        raise InputError(
            f"{path}: label value {value} outside the allowed range {low}..{high} "
            f"(255 = ignore; num_classes={num_classes}, reduce_zero_label={reduce_zero_label})"
        )
    return label.astype(np.uint8)


def read_depth_png(path: str | Path) -> np.ndarray:
    """Read a uint16 millimetre depth PNG as float32 metres H×W; 0 stays 0 (no measurement)."""
    img, file_format = _open_decoded(path)
    if file_format != "PNG":
        raise InputError(f"{path}: not a PNG file ({file_format}); depth must be a 16-bit PNG in millimetres")
    if img.mode not in ("I;16", "I"):
        raise InputError(f"{path}: not a 16-bit depth PNG (mode {img.mode}); expected uint16 millimetres")
    millimetres = np.asarray(img).astype(np.int64)
    if millimetres.min(initial=0) < 0 or millimetres.max(initial=0) > np.iinfo(np.uint16).max:
        raise InputError(f"{path}: depth values outside the uint16 range")
    return (millimetres / _DEPTH_SCALE).astype(np.float32)


def write_depth_png(path: str | Path, depth: np.ndarray) -> None:
    """Write metres as a uint16 millimetre PNG, the inverse of :func:`read_depth_png`.

    Values are rounded to the nearest millimetre and clipped to 0..65.535 m; non-finite values
    become 0 (no measurement), the convention of NYUv2 ground truth.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be H×W, got shape {depth.shape}")
    millimetres = np.where(np.isfinite(depth), np.round(depth * _DEPTH_SCALE), 0.0)
    millimetres = np.clip(millimetres, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    Image.fromarray(millimetres).save(path, format="PNG")


def check_same_size(
    image: np.ndarray, image_path: str | Path, target: np.ndarray, target_path: str | Path
) -> None:
    """Raise when a label or depth map does not cover its image pixel for pixel."""
    if image.shape[:2] != target.shape[:2]:
        ih, iw = image.shape[:2]
        th, tw = target.shape[:2]
        raise InputError(
            f"{target_path}: size {th}x{tw} (HxW) does not match image {image_path} of size {ih}x{iw}"
        )
