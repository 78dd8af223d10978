"""``iedp predict``: run a trained checkpoint on the user's own images, of any size, and write pictures.

Inference is the one path of :mod:`iedp.engine.inference` (:func:`~iedp.engine.inference.predict_image`: the
evaluation protocol of the checkpoint's config, the same device and precision handling), so a picture shows
exactly what ``iedp evaluate`` scores. Only the method's inference context runs: for ``iedp`` the
implicit branch, which needs no labels or prompts.

Files written per input image ``<stem>`` (``<stem>_1``, ``<stem>_2``... when several inputs share a stem):

- segmentation: ``<stem>_labels.png`` 8-bit class indices 0..K-1 in the checkpoint's class order (16-bit
  beyond 256 classes), at the input's size (not ADE20K's 1..150 file convention: ``iedp evaluate --save-predictions`` writes that);
  ``<stem>_mask.png`` the classes in colour (:func:`iedp.visualize.palette`); ``<stem>_overlay.png`` the
  image with the mask blended in and, to its right, a legend of the classes found, largest first.
- depth: ``<stem>_depth.png`` uint16 millimetres at the input's size, like NYUv2's ground truth;
  ``<stem>_depth_color.png`` the depth in Turbo colours, near red, far blue, on the fixed scale 0..model.max_depth
  metres, with a colour bar in metres to its right.

Both tasks see the image as the model was trained: rescaled so its short side is the training resolution
(segmentation: ``eval.short_side``; depth: ``data.resolution`` for synthetic scenes, else ``data.crop_size``), the
prediction resized back to the input's size.

An output never overwrites an input: a name that would is given the next free ``_1``, ``_2``... stem. An image
that cannot be read is logged and skipped; the others are still processed, and the failures are listed at the end
(an :class:`~iedp.errors.InputError`, exit status 2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from iedp.api import Pipeline
from iedp.config import Config
from iedp.data.images import read_rgb, write_depth_png
from iedp.engine.inference import (
    for_inference,
    predict_image,
    predict_labels,
    resolve_device,
    resolve_dtype,
)
from iedp.errors import InputError
from iedp.model_files import load_model
from iedp.models.iedp import IEDPModel
from iedp.outputs import check_output_dir
from iedp.video import is_video, predict_video
from iedp.visualize import (
    beside,
    classes_by_area,
    colorize_depth,
    colorize_labels,
    format_share,
    label_legend,
    overlay,
    palette,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File types taken from a folder input (case-insensitive); files named explicitly are read whatever their name."""

MIN_DEPTH_M = 1e-3
"""Depth predictions are written as at least 1 mm: 0 in a depth PNG means "no measurement"."""


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by their image files (sorted, not recursive); checked before the model loads."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return paths


OUTPUT_KINDS = ("labels", "mask", "overlay", "depth", "depth_color")


def output_stems(paths: Sequence[Path], out_dir: Path | None = None) -> list[str]:
    """One distinct output stem per input: the file's stem, with ``_1``, ``_2``... when it is already taken, or
    when one of its outputs in ``out_dir`` would be an input file (``x_mask.png`` among the inputs).

    Compared case-insensitively, so ``A.jpg`` and ``a.png`` do not overwrite each other on macOS or Windows.
    """
    inputs = {str(p.resolve()).casefold() for p in paths}

    def clobbers(stem: str) -> bool:
        return out_dir is not None and any(
            str((out_dir / f"{stem}_{kind}.png").resolve()).casefold() in inputs for kind in OUTPUT_KINDS
        )

    used: set[str] = set()
    stems = []
    for path in paths:
        stem, counter = path.stem, 0
        while stem.casefold() in used or clobbers(stem):
            counter += 1
            stem = f"{path.stem}_{counter}"
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def segment_image(
    model: IEDPModel,
    image: np.ndarray,
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """H×W class indices of an H×W×3 uint8 image of any size.

    The image is rescaled as the evaluation set is (:func:`~iedp.engine.inference.model_input`) and the scores
    are resized back to the input's size before the argmax (in bands for large images,
    :func:`~iedp.engine.inference.predict_labels`).
    """
    return predict_labels(model, image, config, device, dtype).cpu().numpy()


def estimate_image_depth(
    model: IEDPModel,
    image: np.ndarray,
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """H×W metres of an H×W×3 uint8 image of any size: rescaled so its short side is the training resolution
    (as segmentation is, :func:`~iedp.engine.inference.model_input`), predicted, and resized back to the
    input's size."""
    return predict_image(model, image, config, device, dtype)[0].cpu().numpy()


def write_segmentation(
    image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], out_dir: Path, stem: str
) -> list[Path]:
    """Write ``_labels`` (class indices), ``_mask`` (colours) and ``_overlay`` (blend + legend) PNGs."""
    colors = palette(len(class_names))
    # argmax labels ignore no pixel: with more than 255 classes, 255 is a class
    mask = colorize_labels(labels, colors, ignore_index=None)
    index_dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    outputs = {
        "labels": Image.fromarray(labels.astype(index_dtype)),
        "mask": Image.fromarray(mask),
        "overlay": beside(overlay(image, mask), label_legend(labels, class_names, colors, ignore_index=None)),
    }
    paths = []
    for kind, picture in outputs.items():
        path = out_dir / f"{stem}_{kind}.png"
        picture.save(path)
        paths.append(path)
    return paths


def depth_colorbar(height: int, max_depth: float, width: int = 56) -> Image.Image:
    """A vertical Turbo bar for 0 (top, red) .. ``max_depth`` (bottom, blue) metres with ticks in metres."""
    height = max(height, 48)
    ramp = np.linspace(0.0, max_depth, height)[:, None].repeat(12, axis=1)
    bar = Image.new("RGB", (width, height), "white")
    bar.paste(Image.fromarray(colorize_depth(ramp, vmin=0.0, vmax=max_depth, invalid=-1.0)), (2, 0))
    draw = ImageDraw.Draw(bar)
    for fraction in (0.0, 0.5, 1.0):
        y = min(int(fraction * (height - 1)), height - 11)
        draw.text((16, y), f"{fraction * max_depth:g} m", fill="black")
    return bar


def write_depth(depth: np.ndarray, out_dir: Path, stem: str, max_depth: float | None = None) -> list[Path]:
    """Write ``_depth`` (uint16 millimetres) and ``_depth_color`` PNGs: Turbo colours on the fixed scale
    0..``max_depth`` metres with a colour bar (without ``max_depth``: the image's own range, no bar)."""
    depth_path = out_dir / f"{stem}_depth.png"
    write_depth_png(depth_path, np.maximum(depth, MIN_DEPTH_M))
    color_path = out_dir / f"{stem}_depth_color.png"
    if max_depth is None:
        Image.fromarray(colorize_depth(depth)).save(color_path)
    else:
        colors = colorize_depth(depth, vmin=0.0, vmax=max_depth, invalid=-1.0)
        beside(colors, depth_colorbar(depth.shape[0], max_depth)).save(color_path)
    return [depth_path, color_path]


def describe_classes(labels: np.ndarray, class_names: Sequence[str], shown: int = 3) -> str:
    """The log line's summary of a label map, e.g. ``5 classes: wall 41%, floor 22%, bed 12%, ...``."""
    present = classes_by_area(labels, ignore_index=None)
    listed = ", ".join(f"{class_names[k]} {format_share(fraction)}" for k, fraction in present[:shown])
    return f"{len(present)} classes: {listed}{', ...' if len(present) > shown else ''}"


def _predict_image(
    model: IEDPModel,
    config: Config,
    image: np.ndarray,
    out_dir: Path,
    stem: str,
    device: torch.device,
    precision: torch.dtype,
) -> tuple[list[Path], str]:
    """Predict one H×W×3 image and write its files as ``out_dir/stem_*``; the files and the log line's summary."""
    if model.task == "seg":
        labels = segment_image(model, image, config, device, precision)
        files = write_segmentation(image, labels, model.class_names, out_dir, stem)
        return files, describe_classes(labels, model.class_names)
    depth = estimate_image_depth(model, image, config, device, precision)
    files = write_depth(depth, out_dir, stem, max_depth=config.model.max_depth)
    return files, f"depth {depth.min():.2f}..{depth.max():.2f} m"


def predict_paths(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    device: str | None = None,
    dtype: str | None = None,
    video_batch: int = 4,
    raw_frames: bool = False,
) -> list[Path]:
    """``iedp predict CHECKPOINT IMAGE_OR_DIR... --out DIR [--set key=value] [--device D] [--dtype T]``; returns
    the files written. A video file (:data:`iedp.video.VIDEO_SUFFIXES`) becomes ``<stem>_side_by_side.mp4``,
    its frames predicted ``video_batch`` at a time, and with ``raw_frames`` one PNG per frame
    (:func:`iedp.video.predict_video`).

    The model is loaded once and runs on ``device`` (default: the GPU when there is one) in ``dtype``
    (default: bf16 where the device runs it natively, a GPU with bf16 or a CPU with AVX512-BF16/AMX, else
    fp32; :func:`~iedp.engine.inference.resolve_dtype`), resolved as ``iedp evaluate`` resolves them.
    Inputs are all checked first, so a missing path fails before the model loads; an unreadable image
    stops the run with its name.
    """
    paths = expand_inputs(inputs)
    check_output_dir(out_dir, "--out")  # before the model loads: a file, read-only or /proc fails at once
    model, config = load_model(checkpoint, overrides=overrides)
    if model.method == "explicit":
        raise InputError(
            f"checkpoint {checkpoint}: method 'explicit' is an oracle that needs ground-truth labels; "
            "predict runs vpd, implicit and iedp checkpoints"
        )
    device = resolve_device(device)
    precision = resolve_dtype(dtype, device)
    for_inference(model, device, precision)
    out_dir = check_output_dir(out_dir, "--out")
    videos = sum(map(is_video, paths))
    logger.info(
        "predicting %d image(s) and %d video(s) with %s (%s, %s) on %s in %s",
        len(paths) - videos,
        videos,
        checkpoint,
        model.task,
        model.method,
        device,
        str(precision).removeprefix("torch."),
    )

    written: list[Path] = []
    failed: list[str] = []
    for path, stem in zip(paths, output_stems(paths, out_dir), strict=True):
        start = time.perf_counter()
        if is_video(path):
            pipeline = Pipeline(model, config, device=device, dtype=precision)
            written += predict_video(pipeline, path, out_dir, stem, video_batch, raw_frames)
            continue
        try:
            image = read_rgb(path)
        except InputError as error:  # go on with the other images; listed at the end
            logger.error("%s", error)
            failed.append(str(error))
            continue
        files, summary = _predict_image(model, config, image, out_dir, stem, device, precision)
        written += files
        height, width = image.shape[:2]
        logger.info(
            "%s (%dx%d): %s -> %s_*.png (%.1fs)",
            path,
            width,
            height,
            summary,
            out_dir / stem,
            time.perf_counter() - start,
        )
    if failed:
        raise InputError(
            f"{len(failed)} of {len(paths)} inputs failed ({len(paths) - len(failed)} done, in {out_dir}): "
            + "; ".join(failed[:5])
            + (f"; ... ({len(failed) - 5} more)" if len(failed) > 5 else "")
        )
    return written
