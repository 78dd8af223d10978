"""Pictures of predictions with numpy and PIL only: class colours, depth colours, legends and titled strips.

Used by ``iedp predict`` (mask, overlay, coloured depth) and the demo report (input | ground truth | prediction).
Every function takes and returns uint8 H×W×3 arrays (or a PIL image where text is drawn), so they compose freely.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iedp.data.images import IGNORE_INDEX

BACKGROUND = (255, 255, 255)
"""Colour behind legends, titles and the padding of images of unequal size."""

TEXT_COLOR = (0, 0, 0)

BLACK = (0, 0, 0)
"""Colour of ignored and invalid pixels."""

# Key colours of Google's Turbo colormap (A. Mikhailov, 2019) at x = 0, 1/8, ..., 1, read off its published
# table and rounded; linear interpolation between them gives a Turbo-like map: dark blue, blue, cyan, green,
# yellow, orange, dark red. It has no black entry, so black can mark invalid pixels.
_TURBO_KEYS = np.array(
    [
        [48, 18, 59],
        [70, 107, 227],
        [41, 187, 236],
        [42, 239, 159],
        [164, 252, 60],
        [225, 221, 55],
        [251, 128, 34],
        [214, 56, 6],
        [122, 4, 3],
    ],
    dtype=np.float64,
)


def _turbo_lut(size: int = 256) -> np.ndarray:
    """(size, 3) uint8 table interpolated between the Turbo key colours, low values first."""
    x = np.linspace(0.0, 1.0, size)
    keys = np.linspace(0.0, 1.0, len(_TURBO_KEYS))
    rgb = np.stack([np.interp(x, keys, _TURBO_KEYS[:, c]) for c in range(3)], axis=1)  # (size, 3)
    return np.round(rgb).astype(np.uint8)


TURBO = _turbo_lut()
"""The colormap of :func:`colorize_depth` and :func:`heatmap`: 256 RGB entries, low values first."""


# sRGB (D65) -> CIE XYZ, and the D65 white point (IEC 61966-2-1): for distances between colours as seen.
_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])

_PALETTE_LEVELS = 32
"""Levels per channel of the RGB grid :func:`palette` picks from (32,768 candidate colours)."""


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB colours -> (..., 3) CIELAB (L in 0..100), where Euclidean distance approximates how
    different two colours look (ΔE*76: about 2.3 is just noticeable)."""
    srgb = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    delta = 6 / 29
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


@functools.cache
def _distinct_colours(num_classes: int) -> np.ndarray:
    levels = np.round(np.linspace(0, 255, _PALETTE_LEVELS)).astype(np.uint8)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(candidates).astype(np.float32)
    # squared distance from each candidate to its nearest colour taken so far, black and white first
    nearest = np.full(len(candidates), np.inf, dtype=np.float32)
    for taken in (srgb_to_lab(np.array(BLACK)), srgb_to_lab(np.array(BACKGROUND))):
        nearest = np.minimum(nearest, ((lab - taken.astype(np.float32)) ** 2).sum(axis=1))
    picked = []
    for _ in range(num_classes):
        index = int(np.argmax(nearest))
        picked.append(index)
        nearest = np.minimum(nearest, ((lab - lab[index]) ** 2).sum(axis=1))
    colors = candidates[picked]
    colors.flags.writeable = False
    return colors


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 class colours, as distinct as colours get, the same for every run and machine.

    ADE20K's official palette is not shipped, so this is Glasbey et al.'s (2007) greedy construction: class k
    takes the colour, from a 32-level RGB grid, farthest in CIELAB from black (ignored pixels), white (the
    pictures' background) and classes 0..k-1. A small dataset's few classes get the most distinct colours
    (19 classes: no two closer than ΔE 42; 150: 17), and a class keeps its colour whatever the number of classes.
    """
    limit = _PALETTE_LEVELS**3 - 2
    if not 0 <= num_classes <= limit:
        raise ValueError(f"num_classes: {num_classes} is outside 0..{limit}")
    return _distinct_colours(num_classes).copy()


def colorize_labels(
    labels: np.ndarray, colors: np.ndarray, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """H×W class indices -> H×W×3 uint8 colours; ``ignore_index`` pixels are black.

    ``ignore_index=None`` for predictions, which ignore nothing: with more than 255 classes, 255 is a class.
    """
    labels = np.asarray(labels)
    ignored = _ignored(labels, ignore_index)
    valid = labels[~ignored]
    if valid.size and (valid.min() < 0 or valid.max() >= len(colors)):
        raise ValueError(
            f"labels hold values {valid.min()}..{valid.max()}, but the palette has {len(colors)} colours "
            f"(and {ignore_index} means ignore)"
        )
    rgb = np.asarray(colors, dtype=np.uint8)[np.where(ignored, 0, labels)]
    rgb[ignored] = BLACK
    return rgb


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an image: (1 - alpha) × image + alpha × mask, rounded to uint8."""
    if image.shape != mask_rgb.shape:
        raise ValueError(f"image has shape {image.shape} but the mask has {mask_rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: {alpha} is outside 0..1")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.round(blended).astype(np.uint8)


def _ignored(labels: np.ndarray, ignore_index: int | None) -> np.ndarray:
    """Boolean mask of the ignored pixels (none when ``ignore_index`` is None)."""
    if ignore_index is None:
        return np.zeros(labels.shape, dtype=bool)
    return labels == ignore_index


def classes_by_area(labels: np.ndarray, ignore_index: int | None = IGNORE_INDEX) -> list[tuple[int, float]]:
    """(class, fraction of the labelled pixels) for each class present, largest first (ties: lower index)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    keep = ~_ignored(values, ignore_index)
    values, counts = values[keep], counts[keep]
    order = np.lexsort((values, -counts))
    total = counts.sum()
    return [(int(values[i]), float(counts[i] / total)) for i in order]


def format_share(fraction: float) -> str:
    """A class's share of the image as a percentage; "<1%" rather than a misleading "0%" for a few pixels."""
    percent = round(fraction * 100)
    return f"{percent}%" if percent >= 1 else "<1%"


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font: no font file to ship or find; loaded once, as every legend row and title uses it."""
    return ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    """(width, height) of ``text`` in the default font, measured from its bounding box at the origin."""
    _, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font())
    return right, bottom


def legend(names: Sequence[str], colors: np.ndarray, swatch: int = 12, padding: int = 4) -> Image.Image:
    """A white box listing ``names`` top to bottom, each after a ``swatch``-pixel square of its colour.

    The entries are drawn in the given order: callers pass the classes present sorted by area
    (:func:`label_legend`), so the dominant classes come first.
    """
    if len(names) != len(colors):
        raise ValueError(f"{len(names)} names but {len(colors)} colours")
    sizes = [_text_size(name) for name in names]
    row = max([swatch, *(h for _, h in sizes)])
    width = padding * 3 + swatch + max((w for w, _ in sizes), default=0)
    height = padding + len(names) * (row + padding)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        top = padding + i * (row + padding)
        square_top = top + (row - swatch) // 2
        draw.rectangle(
            (padding, square_top, padding + swatch - 1, square_top + swatch - 1),
            fill=tuple(int(c) for c in color),
            outline=TEXT_COLOR,
        )
        draw.text((padding * 2 + swatch, top), name, fill=TEXT_COLOR, font=_font())
    return image


def label_legend(
    labels: np.ndarray,
    class_names: Sequence[str],
    colors: np.ndarray,
    ignore_index: int | None = IGNORE_INDEX,
) -> Image.Image:
    """Legend of the classes present in ``labels``, largest area first, each with its share ("wall 34%")."""
    present = classes_by_area(labels, ignore_index)
    names = [f"{class_names[k]} {format_share(fraction)}" for k, fraction in present]
    return legend(names, np.asarray(colors)[[k for k, _ in present]])


def beside(image: np.ndarray | Image.Image, extra: np.ndarray | Image.Image) -> Image.Image:
    """``image`` with ``extra`` (a legend) to its right, top-aligned; the shorter one is padded with white."""
    return _hstack([_as_pil(image), _as_pil(extra)])


def colorize_depth(
    depth: np.ndarray, vmin: float | None = None, vmax: float | None = None, invalid: float = 0.0
) -> np.ndarray:
    """H×W metres -> H×W×3 uint8 Turbo colours: ``vmin`` (near) dark red, ``vmax`` (far) dark blue.

    Pixels equal to ``invalid`` (0: no measurement, the NYUv2 convention) or not finite are black. The range
    defaults to the valid pixels' minimum and maximum, so each picture uses the whole colormap; pass a fixed
    range to compare pictures with each other.
    """
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth != invalid)
    if vmin is None:
        vmin = float(depth[valid].min()) if valid.any() else 0.0
    if vmax is None:
        vmax = float(depth[valid].max()) if valid.any() else 1.0
    nearness = 1.0 - _normalized(depth, vmin, vmax)  # near is warm, far is cool
    rgb = TURBO[np.round(nearness * (len(TURBO) - 1)).astype(np.int64)]
    rgb[~valid] = BLACK
    return rgb


def heatmap(values: np.ndarray) -> np.ndarray:
    """H×W floats (an attention map) -> H×W×3 uint8 Turbo colours, its minimum dark blue, its maximum dark red."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    scaled = _normalized(values, float(values.min()), float(values.max()))
    return TURBO[np.round(scaled * (len(TURBO) - 1)).astype(np.int64)]


def _normalized(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(values - vmin) / (vmax - vmin) clipped to [0, 1], non-finite values at 0; a flat range maps to 0."""
    span = vmax - vmin
    scaled = (values - vmin) / span if span > 0 else np.zeros_like(values)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)


def panel(images: Sequence[np.ndarray], titles: Sequence[str]) -> Image.Image:
    """Images side by side, each under its title: the demo report's input | ground truth | prediction strip.

    The width is the sum of the image widths (no gaps); images of different heights are top-aligned on white.
    """
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if not images:
        raise ValueError("panel needs at least one image")
    title_height = max(_text_size(title)[1] for title in titles) + 4
    columns = []
    for image, title in zip(images, titles, strict=True):
        tile = _as_pil(image)
        column = Image.new("RGB", (tile.width, title_height + tile.height), BACKGROUND)
        ImageDraw.Draw(column).text((2, 2), title, fill=TEXT_COLOR, font=_font())
        column.paste(tile, (0, title_height))
        columns.append(column)
    return _hstack(columns)


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from an H×W×3 uint8 array (or a PIL image, converted to RGB)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got shape {array.shape} and dtype {array.dtype}")
    return Image.fromarray(array)


def _hstack(images: Sequence[Image.Image]) -> Image.Image:
    """Left to right, top-aligned, padded below with white to the tallest."""
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), BACKGROUND)
    left = 0
    for image in images:
        canvas.paste(image, (left, 0))
        left += image.width
    return canvas


def vstack(rows: Sequence[Image.Image]) -> Image.Image:
    """Rows of pictures (e.g. :func:`panel` strips) top to bottom, left-aligned, padded right with white."""
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), BACKGROUND)
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    return canvas
