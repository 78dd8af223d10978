"""The Python API: ``iedp.load(path_or_hub_id)`` gives a model that is called on images and returns typed results.

    import iedp
    model = iedp.load("runs/ade20k_iedp/final")            # a checkpoint folder, or a Hugging Face Hub id
    result = model("photo.jpg")                             # a path, PIL image, numpy array, or a list of them
    result.labels, result.overlay, result.areas()           # (H, W) class indices at the input's size, ...
    model.save_pretrained("my-model")                       # checkpoint + model card; push_to_hub("me/my-model")

Every prediction goes through :func:`iedp.engine.inference.predict_image`, the path ``iedp predict`` and
``iedp evaluate`` use, with the same device and precision handling, so the API gives exactly their pictures.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from iedp.config import Config
from iedp.data.images import max_pixels, read_rgb
from iedp.engine.inference import (
    class_attention,
    for_inference,
    predict_batch,
    predict_image,
    predict_labels,
    resolve_device,
    resolve_dtype,
    scores_are_probabilities,
)
from iedp.errors import InputError
from iedp.hub import METRICS_NAME, read_metrics, write_model_card
from iedp.model_files import CONFIG_NAME, WEIGHTS_NAME, load_model, model_state, save_model
from iedp.models.iedp import IEDPModel
from iedp.outputs import json_text
from iedp.visualize import (
    beside,
    classes_by_area,
    colorize_depth,
    colorize_labels,
    label_legend,
    overlay,
    palette,
)

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""What the model is called on: a file path, a PIL image (any mode) or an H×W / H×W×3 / H×W×4 array (uint8, or
floats in [0, 1])."""


@dataclass
class SegmentationOutput:
    """One image's segmentation, at the input's size.

    Attributes:
        image: the input as H×W×3 uint8 RGB.
        labels: H×W int64 class indices 0..K-1 into ``class_names``.
        class_names: the K class names, in the checkpoint's order.
        mask: the labels in colour (:func:`iedp.visualize.palette`), H×W×3 uint8.
        overlay: the image with the mask blended in, as a PIL image.
        probabilities: K×H×W float32 class probabilities, if asked for (``probabilities=True``).
        attention: C×H×W float32 class cross-attention maps, if asked for (``attention=True``).
    """

    image: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    mask: np.ndarray
    overlay: Image.Image
    probabilities: np.ndarray | None = None
    attention: np.ndarray | None = field(default=None, repr=False)

    def areas(self) -> dict[str, float]:
        """Share of the image of each class present, largest first."""
        return {self.class_names[k]: share for k, share in classes_by_area(self.labels, ignore_index=None)}

    def overlay_with_legend(self) -> Image.Image:
        """The overlay with a legend of the classes present to its right (``iedp predict``'s ``_overlay.png``)."""
        colors = palette(len(self.class_names))
        return beside(self.overlay, label_legend(self.labels, self.class_names, colors, ignore_index=None))


@dataclass
class DepthOutput:
    """One image's depth, at the input's size.

    Attributes:
        image: the input as H×W×3 uint8 RGB.
        depth: H×W float32 metres.
        color: the depth in Turbo colours on the model's fixed scale, 0 (red) .. ``max_depth`` (blue) metres, as
            a PIL image: the left part of ``iedp predict``'s ``_depth_color.png``.
        max_depth: the top of that scale, the model's ``max_depth``.
    """

    image: np.ndarray
    depth: np.ndarray
    color: Image.Image
    max_depth: float = 10.0


Output = SegmentationOutput | DepthOutput


def to_rgb(image: ImageInput) -> np.ndarray:
    """H×W×3 uint8 RGB of any supported input, converted as ``iedp predict`` converts files (alpha dropped,
    grey repeated, EXIF orientation applied to PIL images)."""
    if isinstance(image, str | os.PathLike):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels():
            raise InputError(
                f"image is {image.width}x{image.height}, above the limit of {max_pixels()} pixels"
            )
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I", "F"):
            raise InputError(f"not a colour image (mode {image.mode}, looks like a depth or label map)")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim >= 2 and array.shape[0] * array.shape[1] > max_pixels():
            raise InputError(
                f"image array is {array.shape[1]}x{array.shape[0]}, above the limit of {max_pixels()} pixels"
            )
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"image array: dtype {array.dtype} (expected uint8, or floats in [0, 1])")
            if not np.isfinite(array).all():
                raise InputError("image array: holds NaN or infinite values")
            if array.size and (array.min() < 0 or array.max() > 1):
                raise InputError(
                    f"image array: float values span {array.min():g}..{array.max():g}, expected 0..1 "
                    "(pass uint8 for 0..255, or divide by 255)"
                )
            array = np.round(array * 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4) or 0 in array.shape:
            raise InputError(f"image array: shape {image.shape} (expected H×W, H×W×3 or H×W×4)")
        return np.ascontiguousarray(array[..., :3])
    raise InputError(f"image: {type(image).__name__} is not a path, PIL image or numpy array")


class Pipeline:
    """A loaded checkpoint, ready to run: call it on an image or a list of images.

    Args:
        model: the task model (in eval mode).
        config: its resolved run config; ``config.eval`` sets the inference protocol (windows, scales, flips).
        device: where it runs (default: the GPU when there is one).
        dtype: inference precision, ``auto`` (bf16 where the GPU or CPU runs it natively, else fp32), ``fp32``, ``bf16``, ``fp16``.
        source: the folder or hub id it came from, for its model card.

    :meth:`from_pretrained` holds the weights in ``dtype``, as ``iedp predict`` does (half the memory in bf16, and
    faster on a CPU than casting fp32 weights at every call); :meth:`save_pretrained` still writes the checkpoint's
    own weights, bit for bit. A model passed in directly is run as it is held.
    """

    def __init__(
        self,
        model: IEDPModel,
        config: Config,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        source: str | Path | None = None,
    ) -> None:
        if model.method == "explicit":
            raise InputError(
                "method 'explicit' is an oracle that needs ground-truth labels; the API runs vpd, implicit "
                "and iedp checkpoints"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.eval().to(self.device)
        self.config = config
        self.source = source
        self._checkpoint: Path | None = None  # the local folder from_pretrained read, for save_pretrained

    # -- loading and saving ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        overrides: Sequence[str] = (),
        revision: str | None = None,
        token: str | None = None,
    ) -> Pipeline:
        """Load a checkpoint folder, or download one from the Hugging Face Hub (a ``user/name`` id).

        A local folder never touches the network; ``overrides`` change ``data``/``eval`` keys (``--set``).
        """
        folder = Path(path_or_hub_id).expanduser()
        if not folder.exists():
            folder = download(str(path_or_hub_id), revision=revision, token=token)
        model, config = load_model(folder, overrides=overrides)
        pipeline = cls(model, config, device=device, dtype=dtype, source=path_or_hub_id)
        for_inference(pipeline.model, pipeline.device, pipeline.dtype)
        pipeline._checkpoint = folder
        return pipeline

    def save_pretrained(self, out_dir: str | Path, metrics: dict | None = None) -> Path:
        """Write a hub folder: the checkpoint (``model.safetensors`` + ``config.json``), ``metrics.json`` (the
        last evaluation, when known) and a ``README.md`` model card. Loads back bit for bit."""
        out_dir = save_model(self.model, self.config, out_dir, self._weights_to_save())
        metrics = metrics if metrics is not None else self.metrics()
        if metrics:
            (out_dir / METRICS_NAME).write_text(_metrics_json(metrics), encoding="utf-8")
        write_model_card(out_dir, self.model, self.config, metrics)
        return out_dir

    def _weights_to_save(self) -> dict[str, torch.Tensor] | None:
        """None when the model holds fp32 weights (saved as held). Held in a lower precision: the checkpoint's own
        weights if the held ones are exactly their rounding (unchanged since loading), else the held ones in fp32."""
        held = model_state(self.model)
        if all(t.dtype == torch.float32 for t in held.values() if t.is_floating_point()):
            return None
        if self._checkpoint is not None:
            loaded = load_file(self._checkpoint / WEIGHTS_NAME)
            if loaded.keys() == held.keys() and all(
                torch.equal(loaded[k].to(t.dtype), t) for k, t in held.items()
            ):
                return loaded
        logger.warning(
            "saving weights held in %s (changed since they were loaded, or not loaded from a folder): they are "
            "written in fp32 but keep that precision's rounding",
            str(self.dtype).removeprefix("torch."),
        )
        return {k: t.float() if t.is_floating_point() else t for k, t in held.items()}

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload iedp model",
    ) -> str:
        """Create (or reuse) the hub repo ``repo_id`` and upload :meth:`save_pretrained`'s folder; returns its
        URL. Needs network access and a token with write rights (``huggingface-cli login``)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(url)

    def metrics(self) -> dict | None:
        """The metrics of the source folder's last evaluation (``metrics.json``), if it is a local folder."""
        if self.source is None or not Path(self.source).is_dir():
            return None
        return read_metrics(Path(self.source))

    def to(self, device: str | torch.device) -> Pipeline:
        self.device = resolve_device(device)
        if self._checkpoint is None:  # a model passed in: moved as it is held
            self.model.to(self.device)
        else:  # held for inference: in the UNet layout of the new device too
            for_inference(self.model, self.device, self.dtype)
        return self

    # -- inference ------------------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.model.task

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        probabilities: bool = False,
        attention: bool = False,
    ) -> Output | list[Output]:
        """Predict one image (returns one result) or a list of them (returns a list).

        Each image runs at its own size through the checkpoint's evaluation protocol, its windows batched
        (``eval.batch_size``); no labels are needed. ``probabilities`` adds per-class probabilities and
        ``attention`` the class cross-attention maps (segmentation).
        """
        if isinstance(images, list | tuple):
            return [self.predict_one(image, probabilities, attention) for image in images]
        return self.predict_one(images, probabilities, attention)

    def predict_one(self, image: ImageInput, probabilities: bool = False, attention: bool = False) -> Output:
        if self.task != "seg" and (probabilities or attention):
            raise InputError("probabilities and attention: segmentation only; a depth model gives metres")
        rgb = to_rgb(image)
        if self.task == "seg" and not probabilities:  # labels only: bounded memory at any image size
            labels = predict_labels(self.model, rgb, self.config, self.device, self.dtype)
            return self.segmentation(rgb, labels, attention=attention)
        scores = predict_image(self.model, rgb, self.config, self.device, self.dtype)
        return self.output(rgb, scores, probabilities, attention)

    def predict_frames(self, frames: Sequence[np.ndarray]) -> list[Output]:
        """Same-size H×W×3 uint8 frames (a video's) predicted together, their windows sharing forward passes."""
        scores = predict_batch(self.model, list(frames), self.config, self.device, self.dtype)
        return [self.output(frame, frame_scores) for frame, frame_scores in zip(frames, scores, strict=True)]

    def output(
        self, rgb: np.ndarray, scores: torch.Tensor, probabilities: bool = False, attention: bool = False
    ) -> Output:
        """The typed result of an image's scores (seg (K, H, W), depth (1, H, W))."""
        if self.task == "depth":
            depth = scores[0].cpu().numpy()
            top = float(self.config.model.max_depth)
            color = Image.fromarray(colorize_depth(depth, vmin=0.0, vmax=top, invalid=-1.0))
            return DepthOutput(image=rgb, depth=depth, color=color, max_depth=top)
        probs = None
        if probabilities:
            probs = scores if scores_are_probabilities(self.config) else scores.softmax(dim=0)
        return self.segmentation(rgb, scores.argmax(dim=0), probs, attention)

    def segmentation(
        self,
        rgb: np.ndarray,
        labels: torch.Tensor,
        probabilities: torch.Tensor | None = None,
        attention: bool = False,
    ) -> SegmentationOutput:
        """The segmentation result of an image's label map (and class probabilities when asked for)."""
        labels = labels.cpu().numpy()
        mask = colorize_labels(labels, palette(self.model.num_classes), ignore_index=None)
        result = SegmentationOutput(
            image=rgb,
            labels=labels,
            class_names=self.class_names,
            mask=mask,
            overlay=Image.fromarray(overlay(rgb, mask)),
        )
        if probabilities is not None:
            result.probabilities = probabilities.cpu().numpy()
        if attention:
            maps = class_attention(self.model, rgb, self.config, self.device, self.dtype)
            result.attention = maps.cpu().numpy()
        return result

    def __repr__(self) -> str:
        return (
            f"Pipeline(task={self.task!r}, method={self.method!r}, classes={self.model.num_classes}, "
            f"device={self.device}, dtype={str(self.dtype).removeprefix('torch.')}, source={str(self.source)!r})"
        )


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The checkpoint files of a hub repo, through the hub cache (offline: what the cache already holds)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, "README.md"],
        )
    except HFValidationError:
        raise InputError(f"{repo_id}: no such folder, and not a Hugging Face Hub id (user/name)") from None
    except Exception as error:  # network, authentication, missing repo: one line naming what failed
        raise InputError(f"{repo_id}: no such folder, and the hub download failed ({error})") from None
    return Path(folder)


def load(
    path_or_hub_id: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    overrides: Sequence[str] = (),
) -> Pipeline:
    """``iedp.load``: :meth:`Pipeline.from_pretrained`."""
    return Pipeline.from_pretrained(path_or_hub_id, device=device, dtype=dtype, overrides=overrides)


def _metrics_json(metrics: dict) -> str:
    return json_text({"metrics": metrics}, sort_keys=True)
