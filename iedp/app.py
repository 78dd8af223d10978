"""``iedp serve CKPT [CKPT ...]``: a Gradio web app over one or more checkpoints (``pip install "iedp[app]"``).

Drop or pick an image, pick a checkpoint, press *Run*:

- segmentation: the overlay with its legend, the area of each class, the class cross-attention map of a class
  chosen from a list, and the label PNG (class indices) to download;
- depth: the Turbo colour map with a scale bar in metres, a 3D view of the back-projected point cloud (focal
  length adjustable) and the uint16 millimetre PNG and ``.ply`` to download.

Every prediction goes through the API (:class:`iedp.api.Pipeline`), so it is what ``iedp predict`` writes. A bad
upload (not an image, too many pixels) is one message in the page; the server keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from iedp.api import Pipeline, SegmentationOutput
from iedp.data.images import read_rgb, write_depth_png
from iedp.errors import InputError
from iedp.pointcloud import default_focal, depth_to_points, write_ply
from iedp.visualize import BACKGROUND, TEXT_COLOR, TURBO, beside, heatmap, overlay

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 16_000_000
"""Largest upload the app takes (width × height); ``iedp serve --max-pixels`` changes it."""
VIEW_POINTS = 150_000
"""At most this many points go to the 3D view (the .ply download keeps every pixel)."""
KEEP_OUTPUTS_S = 3600.0
"""Downloads of a request are kept this long (Gradio serves its own copies meanwhile)."""


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('iedp serve needs Gradio: pip install "iedp[app]"') from None
    return gr


def depth_scale_bar(vmin: float, vmax: float, height: int, width: int = 70, ticks: int = 5) -> Image.Image:
    """A vertical Turbo bar, near (``vmin``, red) at the top to far (``vmax``, blue) at the bottom, with ticks
    labelled in metres: the key of :func:`iedp.visualize.colorize_depth`'s colours over that range."""
    height = max(height, 60)
    bar = Image.new("RGB", (width, height), BACKGROUND)
    top, bottom, left, right = 8, height - 8, 4, 18
    rows = np.linspace(1.0, 0.0, bottom - top)  # nearness: 1 at the top (vmin), 0 at the bottom (vmax)
    colours = TURBO[np.round(rows * (len(TURBO) - 1)).astype(np.int64)]
    strip = np.repeat(colours[:, None, :], right - left, axis=1).astype(np.uint8)
    bar.paste(Image.fromarray(strip), (left, top))
    draw = ImageDraw.Draw(bar)
    for i in range(ticks):
        y = top + round(i * (bottom - top - 1) / (ticks - 1))
        value = vmin + (vmax - vmin) * i / (ticks - 1)
        draw.line((right, y, right + 4, y), fill=TEXT_COLOR)
        draw.text((right + 7, y - 5), f"{value:.2f} m", fill=TEXT_COLOR)
    return bar


class App:
    """The app's state and handlers, separate from the Gradio layout so they can be tested directly.

    Args:
        checkpoints: checkpoint folders or hub ids, shown by their folder name.
        device, dtype: as for :func:`iedp.load`.
        max_pixels: the largest upload accepted.
    """

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        device: str | None = None,
        dtype: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not checkpoints:
            raise InputError("iedp serve: give at least one checkpoint folder")
        self.sources: dict[str, str] = {}
        for checkpoint in checkpoints:
            name = Path(str(checkpoint)).name or str(checkpoint)
            while name in self.sources:
                name += "'"
            self.sources[name] = str(checkpoint)
        self.device, self.dtype, self.max_pixels = device, dtype, max_pixels
        self._loaded: dict[str, Pipeline] = {}
        self.outputs = Path(tempfile.mkdtemp(prefix="iedp-serve-"))
        for name in self.sources:  # load all now: a bad checkpoint fails at start, not on the first upload
            self.pipeline(name)

    def pipeline(self, name: str) -> Pipeline:
        if name not in self.sources:
            raise InputError(f"checkpoint {name!r} is not one of {', '.join(self.sources)}")
        if name not in self._loaded:
            self._loaded[name] = Pipeline.from_pretrained(
                self.sources[name], device=self.device, dtype=self.dtype
            )
        return self._loaded[name]

    def describe(self, name: str) -> str:
        p = self.pipeline(name)
        kind = "segmentation" if p.task == "seg" else "depth"
        return f"**{name}**: {kind}, method `{p.method}`, {len(p.class_names)} {'classes' if p.task == 'seg' else 'scenes'}, {p.device}"

    def read_upload(self, path: str | None) -> np.ndarray:
        """The uploaded file as RGB, or one clear message (no file, not an image, too large)."""
        if not path:
            raise InputError("upload an image first (PNG, JPEG, WebP, BMP...)")
        name = Path(path).name
        try:
            with Image.open(path) as img:  # the header only: nothing is decoded yet
                width, height = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise InputError(f"{name}: not an image file (PNG, JPEG, WebP, BMP, TIFF...)") from None
        if width * height > self.max_pixels:
            raise InputError(
                f"{name}: {width}×{height} = {width * height:,} pixels is above this app's limit of "
                f"{self.max_pixels:,} (start iedp serve with --max-pixels to raise it)"
            )
        return read_rgb(path)

    def run(
        self, name: str, path: str | None, focal: float | None, attention_class: str | None, progress=None
    ):
        """One prediction: (result picture, class areas, attention map, class list, 3D file, downloads, summary)."""
        step = progress or (lambda *args, **kwargs: None)
        if focal is not None and not float(focal) >= 0:  # checked before any work
            raise InputError(f"focal length: {focal} is not a positive number of pixels (0: automatic)")
        step(0.05, desc="reading the image")
        image = self.read_upload(path)
        pipeline = self.pipeline(name)
        step(0.2, desc=f"running {name}")
        result = pipeline(image)
        stem = Path(path).stem[:60] or "image"
        self.forget_old_outputs()
        folder = Path(tempfile.mkdtemp(dir=self.outputs))
        height, width = image.shape[:2]
        if isinstance(result, SegmentationOutput):
            labels_path = folder / f"{stem}_labels.png"
            index_dtype = np.uint8 if len(result.class_names) <= 256 else np.uint16
            Image.fromarray(result.labels.astype(index_dtype)).save(labels_path)
            areas = result.areas()
            chosen = attention_class if attention_class in areas else next(iter(areas))
            step(0.6, desc=f"attention map of {chosen}")
            attention = self.attention_picture(pipeline, image, chosen)
            order = list(areas) + [c for c in result.class_names if c not in areas]
            summary = f"{width}×{height}, {len(areas)} classes: " + ", ".join(
                f"{c} {100 * a:.1f}%" for c, a in list(areas.items())[:5]
            )
            step(1.0, desc="done")
            return (
                result.overlay_with_legend(),
                areas,
                attention,
                _dropdown(order, chosen),
                None,
                [str(labels_path)],
                summary,
            )
        depth = result.depth
        vmin, vmax = float(depth.min()), float(depth.max())
        picture = beside(result.color, depth_scale_bar(0.0, result.max_depth, height))
        depth_path = folder / f"{stem}_depth.png"
        write_depth_png(depth_path, np.maximum(depth, 1e-3))
        step(0.7, desc="point cloud")
        focal = float(focal) if focal else default_focal(width)
        ply_path = write_ply(folder / f"{stem}.ply", *depth_to_points(depth, image, focal))
        view_path = write_ply(folder / f"{stem}_view.ply", *depth_to_points(depth, image, focal, VIEW_POINTS))
        summary = f"{width}×{height}, depth {vmin:.2f}–{vmax:.2f} m, focal {focal:.0f} px"
        step(1.0, desc="done")
        return (
            picture,
            None,
            None,
            _dropdown([], None),
            str(view_path),
            [str(depth_path), str(ply_path)],
            summary,
        )

    def forget_old_outputs(self, keep_s: float = KEEP_OUTPUTS_S) -> None:
        """Delete the download folders of earlier requests older than ``keep_s`` seconds."""
        now = time.time()
        for folder in self.outputs.iterdir():
            if now - folder.stat().st_mtime > keep_s:
                shutil.rmtree(folder, ignore_errors=True)

    def attention_picture(
        self, pipeline: Pipeline, image: np.ndarray, class_name: str | None
    ) -> Image.Image | None:
        """The chosen class's cross-attention map in Turbo colours, blended over the image."""
        if pipeline.task != "seg" or class_name not in pipeline.class_names:
            return None
        if not pipeline.model.backbone.map_strides:
            return None
        from iedp.engine.inference import class_attention

        maps = class_attention(pipeline.model, image, pipeline.config, pipeline.device, pipeline.dtype)
        return Image.fromarray(
            overlay(image, heatmap(maps[pipeline.class_names.index(class_name)].cpu().numpy()), 0.6)
        )

    def attention(self, name: str, path: str | None, class_name: str | None, progress=None):
        step = progress or (lambda *args, **kwargs: None)
        step(0.1, desc=f"attention map of {class_name}")
        return self.attention_picture(self.pipeline(name), self.read_upload(path), class_name)


def _dropdown(choices: list[str], value: str | None):
    return _gradio().update(choices=choices, value=value)


def build_app(app: App):
    """The Gradio Blocks layout over :class:`App`; API names ``/predict`` and ``/attention`` for gradio_client."""
    gr = _gradio()

    def guarded(handler):
        def call(*args, progress=gr.Progress()):  # noqa: B008 (Gradio injects the tracker by this default)
            try:
                return handler(*args, progress=progress)
            except InputError as error:
                raise gr.Error(str(error), print_exception=False) from None

        return call

    names = list(app.sources)
    with gr.Blocks(title="iedp") as blocks:
        gr.Markdown(
            "# iedp: diffusion-based perception\nDrop or pick an image, choose a checkpoint, press **Run**. "
            "Segmentation shows the classes, their areas and a class's cross-attention map; depth shows metres "
            "with a scale bar and a 3D point cloud."
        )
        with gr.Row():
            with gr.Column(scale=1):
                checkpoint = gr.Dropdown(names, value=names[0], label="Checkpoint", elem_id="checkpoint")
                info = gr.Markdown(app.describe(names[0]), elem_id="info")
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                focal = gr.Number(
                    value=0,
                    label="Focal length in pixels (depth; 0: NYUv2's field of view at this width)",
                )
                run = gr.Button("Run", variant="primary", elem_id="run")
                summary = gr.Markdown(elem_id="summary")
            with gr.Column(scale=2):
                result = gr.Image(
                    label="Result", type="pil", format="png", elem_id="result", interactive=False, height=360
                )
                with gr.Row():
                    areas = gr.Label(label="Class areas", num_top_classes=12)
                    with gr.Column():
                        attention_class = gr.Dropdown(
                            [], label="Attention map of class", allow_custom_value=True
                        )
                        attention = gr.Image(
                            label="Class cross-attention",
                            type="pil",
                            format="png",
                            interactive=False,
                            height=240,
                        )
                cloud = gr.Model3D(
                    elem_id="cloud", label="Point cloud", display_mode="point_cloud", clear_color=(1, 1, 1, 1)
                )
                downloads = gr.File(label="Raw outputs", file_count="multiple", interactive=False)
        checkpoint.change(app.describe, checkpoint, info, api_name=False)
        run.click(
            guarded(app.run),
            [checkpoint, upload, focal, attention_class],
            [result, areas, attention, attention_class, cloud, downloads, summary],
            api_name="predict",
        )
        attention_class.input(
            guarded(app.attention), [checkpoint, upload, attention_class], attention, api_name="attention"
        )
    return blocks


def serve(
    checkpoints: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    block: bool = True,
):
    """Start the app; returns the Gradio Blocks (``block=False`` returns at once, for tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    _gradio()
    app = App(checkpoints, device=device, dtype=dtype, max_pixels=max_pixels)
    blocks = build_app(app)
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        show_error=True,
        max_file_size=f"{max(1, max_pixels * 4 // 1_000_000)}mb",
        quiet=True,  # Gradio's own lines advise launch(share=True); the CLI's option is --share
        ssr_mode=False,
    )
    if block:
        public = f", public link {blocks.share_url}" if blocks.share_url else " (--share adds a public link)"
        print(f"serving on {blocks.local_url}{public}; Ctrl-C stops", flush=True)
        blocks.block_thread()
    return blocks
