"""Video in ``iedp predict``: frames decoded with PyAV (FFmpeg's libraries inside the wheel, no ffmpeg binary),
predicted in batches through the API, written as a side-by-side MP4 (input | prediction) at the input's frame
rate, and on request the raw per-frame outputs (label or uint16 millimetre PNGs).

``pip install "iedp[video]"`` (or ``[app]``) brings PyAV.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from iedp.api import Pipeline, SegmentationOutput
from iedp.data.images import write_depth_png
from iedp.errors import InputError

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
"""File types ``iedp predict`` treats as video (case-insensitive)."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise ImportError('video needs PyAV: pip install "iedp[video]"') from None
    return av


def read_frames(path: str | Path) -> tuple[Iterator[np.ndarray], Fraction, int | None]:
    """(H×W×3 uint8 RGB frames, frame rate, frame count if the container knows it) of a video file."""
    av = _av()
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError) as error:
        raise InputError(f"{path}: not a readable video ({error})") from None
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise InputError(f"{path}: video decoding failed ({error})") from None
        finally:
            container.close()

    return frames(), Fraction(rate), stream.frames or None


class VideoWriter:
    """H.264 MP4 (MPEG-4 Part 2 where the wheel has no x264) of RGB frames of one size; odd sizes are padded
    by one row / column of black, as yuv420p needs even sizes."""

    def __init__(self, path: str | Path, rate: Fraction, width: int, height: int) -> None:
        av = _av()
        self.container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=rate)
        self.width, self.height = width + width % 2, height + height % 2
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "18"}
        self.av = av

    def write(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        if (height, width) != (self.height, self.width):
            rgb = np.pad(rgb, ((0, self.height - height), (0, self.width - width), (0, 0)))
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def prediction_picture(result) -> np.ndarray:
    """The right half of a side-by-side frame: the overlay (seg) or the depth colours on the model's fixed
    0..max_depth scale, so a colour means the same distance in every frame."""
    return np.asarray(result.overlay if isinstance(result, SegmentationOutput) else result.color)


def predict_video(
    pipeline: Pipeline,
    path: str | Path,
    out_dir: str | Path,
    stem: str,
    batch_size: int = 4,
    raw_frames: bool = False,
) -> list[Path]:
    """Write ``<stem>_side_by_side.mp4`` (input | prediction, the input's frame rate) and, with ``raw_frames``,
    ``<stem>_frames/NNNNNN_labels.png`` or ``NNNNNN_depth.png``; returns the files written.
    """
    if batch_size < 1:
        raise InputError(f"--video-batch: {batch_size} must be at least 1")
    out_dir = Path(out_dir)
    frames, rate, count = read_frames(path)
    video_path = out_dir / f"{stem}_side_by_side.mp4"
    frame_dir = out_dir / f"{stem}_frames"
    if raw_frames:
        frame_dir.mkdir(parents=True, exist_ok=True)
    writer: VideoWriter | None = None
    written: list[Path] = []
    index = 0
    progress = tqdm(total=count, desc=Path(path).name, unit="frame", leave=False)
    try:
        for batch in _batches(frames, batch_size):
            results = pipeline.predict_frames(batch)
            for frame, result in zip(batch, results, strict=True):
                side_by_side = np.concatenate([frame, prediction_picture(result)], axis=1)
                if writer is None:
                    writer = VideoWriter(video_path, rate, side_by_side.shape[1], side_by_side.shape[0])
                writer.write(side_by_side)
                if raw_frames:
                    written.append(_write_raw(result, frame_dir, index, pipeline.model.num_classes))
                index += 1
            progress.update(len(batch))
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise InputError(f"{path}: the video has no frames")
    logger.info("%s: %d frames -> %s", path, index, video_path)
    return [video_path, *written]


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        if batch and frame.shape != batch[0].shape:  # a size change mid-stream starts a new batch
            yield batch
            batch = []
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_raw(result, folder: Path, index: int, num_classes: int) -> Path:
    if isinstance(result, SegmentationOutput):
        path = folder / f"{index:06d}_labels.png"
        Image.fromarray(result.labels.astype(np.uint8 if num_classes <= 256 else np.uint16)).save(path)
    else:
        path = folder / f"{index:06d}_depth.png"
        write_depth_png(path, np.maximum(result.depth, 1e-3))
    return path
