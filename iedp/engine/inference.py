"""Test-time inference protocols: sliding windows, flips and scales (DESIGN §3).

Each function takes ``predict``, a callable from an image batch (B, 3, h, w) with h, w multiples of the model's
input multiple to per-pixel outputs (B, K, h, w), so the same code serves segmentation logits and depth maps.

The end of the file is the one path from a loaded checkpoint and an image to a prediction, with its device and
precision (:func:`resolve_device`, :func:`resolve_dtype`, :func:`predict_scores`, :func:`predict_image`):
``iedp evaluate``, ``iedp predict``, the Python API (:mod:`iedp.api`), the web app and the demo all call it, so a
picture shows exactly what ``evaluate`` scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iedp.config import Config
from iedp.data.transforms import normalize, rescale_size, resize_image
from iedp.errors import InputError
from iedp.models.iedp import IEDPModel
from iedp.models.tasks import TASKS

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
    """Average of window predictions over (B, 3, H, W) images of one size -> (B, K, H, W); overlaps are averaged.

    The windows of all B images go through ``predict`` in chunks of ``batch_size`` (video frames share passes)."""
    B, _, H, W = image.shape
    boxes = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    # box-major: the B crops of the first box, then of the second...
    crops = torch.cat([image[..., y : y + window, x : x + window] for y, x in boxes])
    outputs = torch.cat([predict_padded(predict, chunk, multiple) for chunk in crops.split(batch_size)])
    total = image.new_zeros((B, outputs.shape[1], H, W), dtype=outputs.dtype)
    count = image.new_zeros((1, 1, H, W), dtype=outputs.dtype)
    for (y, x), out in zip(boxes, outputs.split(B), strict=True):
        total[:, :, y : y + window, x : x + window] += out
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


# -- one path from a checkpoint and an image to a prediction ---------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` choices besides ``auto``: the autocast precision of inference (weights stay as loaded)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU; otherwise the named device, checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            f"--device: {device!r} is not a device (expected auto, cpu, cuda or cuda:N)"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {device!r} asked for, but PyTorch sees no CUDA device (use cpu or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` or ``"auto"``: bf16 where the hardware runs it natively, else fp32; a named dtype as named.

    Native bf16 means a CUDA GPU with bf16, or a CPU with bf16 instructions: AVX512-BF16 or AMX-BF16, as
    ``torch.cpu.get_capabilities`` reports them. On such a CPU (an EPYC with AVX512-BF16) our default whole
    inference at 512² takes 3.14× less CPU time than VPD's fp32 configuration, and on the demo's 200-step
    checkpoints bf16 label maps agree with fp32 on 99.87 % of pixels (issue 15 asks ≥ 99.5 %) and depth differs by
    0.18 % on average, 0.58 % at the 99th percentile (``bench/precision.py``; BENCHMARKS.md). A CPU without them (AVX2 only; ARM is
    not measured) emulates bf16 through conversions, 4.5–14× slower than fp32 on the demo models on an AVX2 EPYC,
    so it stays in fp32, as does a torch without the capability query. ``"fp32"`` always runs fp32 (e.g. to
    reproduce fp32 numbers exactly).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        else:
            capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # absent from older torch
            bf16 = device.type == "cpu" and any(capabilities.get(k) for k in ("avx512_bf16", "amx_bf16"))
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def for_inference(model: IEDPModel, device: torch.device, dtype: torch.dtype) -> IEDPModel:
    """``model``, loaded for inference only (it is changed in place), in eval mode on ``device`` with its weights
    held in ``dtype``, the precision :func:`autocast` runs it in.

    Under autocast each matmul and convolution casts its fp32 weight to ``dtype`` at every call and keeps the copy
    until the call ends, so fp32 weights cost their own memory plus a ``dtype`` copy. Held in ``dtype`` once, they
    cost half of the first and none of the second, and those ops compute exactly as before; only the few
    parameters autocast leaves in fp32 (normalisation scales and shifts) are rounded. The UNet's weights are
    reordered to channels_last where :func:`unet_channels_last` says so, and back to contiguous elsewhere (a model
    held for a bf16 CPU, then moved to a GPU).
    """
    model.eval().to(device=device, dtype=dtype)
    layout = torch.channels_last if unet_channels_last(device, dtype) else torch.contiguous_format
    model.unet.to(memory_format=layout)
    return model


def unet_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether inference holds the UNet's weights, and so its activations, in channels_last: on a CPU in bf16,
    where oneDNN's bf16 convolutions run faster on it (UNet 1.08×, whole inference 1.06× at 512² on an
    AVX512-BF16 EPYC); not in fp32 (no faster on an AVX2 EPYC) nor on a GPU (every stage slower on an H100).
    BENCHMARKS.md, "UNet channels_last on the CPU"."""
    return device.type == "cpu" and dtype == torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (off for fp32): the precision every inference path runs in."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def model_predictor(model: IEDPModel, sample: dict, device: torch.device) -> Predict:
    """A ``predict`` callable for the inference protocols, carrying along what the method reads besides the image:
    the scene (VPD depth) and the label prompt (the ``explicit`` oracle)."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        batch = {"image": images.to(device)}
        if "scene_id" in sample:
            batch["scene_id"] = torch.full((B,), int(sample["scene_id"]), dtype=torch.long)
        if "prompt" in sample:
            batch["prompt"] = [sample["prompt"]] * B
        return model(batch, mode="predict").float()

    return predict


@torch.no_grad()
def predict_scores(
    model: IEDPModel,
    sample: dict,
    config: Config,
    device: torch.device,
    out_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Seg: class scores (K, H, W) at ``out_size`` (default: the label's size; logits for one view, averaged
    probabilities for several, see :func:`segment`); depth: metres (1, H, W) at the image's size."""
    ec = config.eval
    multiple = model.backbone.input_multiple
    image = sample["image"][None].to(device)
    predict = model_predictor(model, sample, device)
    with autocast(device, dtype):
        if model.task == "seg":
            scores = segment(
                predict,
                image,
                out_size or tuple(sample["label"].shape[-2:]),
                ec.window,
                ec.stride,
                multiple,
                scales=ec.scales if ec.multi_scale else (1.0,),
                flip=ec.multi_scale,
                batch_size=ec.batch_size,
            )
        else:
            scores = estimate_depth(
                predict, image, ec.depth_window, ec.depth_stride, multiple, ec.flip, ec.batch_size
            )
    return scores[0].float()


def predict_sample(
    model: IEDPModel,
    sample: dict,
    config: Config,
    device: torch.device,
    out_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Seg: label map (H, W) at ``out_size`` (default: the label's size); depth: metres (H, W) at the image's."""
    scores = predict_scores(model, sample, config, device, out_size, dtype)
    return TASKS[model.task].to_map(scores)


def scores_are_probabilities(config: Config) -> bool:
    """Whether :func:`predict_scores` gives probabilities (several views averaged) rather than logits."""
    return config.eval.multi_scale


def input_short_side(model: IEDPModel, config: Config) -> int:
    """The short side an image is rescaled to before inference (long side at most 4× that): segmentation
    ``eval.short_side`` (ADE20K's 512), depth the training resolution (``data.resolution`` for synthetic scenes,
    else ``data.crop_size``). The evaluation sets' own images already have it (ADE20K after its rescale, NYUv2's
    480-row frames, synthetic scenes), so ``predict`` on them gives what ``evaluate`` scores."""
    if model.task == "seg":
        return config.eval.short_side
    return config.data.resolution if config.data.dataset == "synthetic" else config.data.crop_size


def model_input(image: np.ndarray, model: IEDPModel, config: Config) -> torch.Tensor:
    """The (3, h, w) tensor the model sees for an H×W×3 uint8 image of any size: rescaled so its short side is
    :func:`input_short_side` (unchanged when it already is)."""
    short = input_short_side(model, config)
    height, width = image.shape[:2]
    size = rescale_size(height, width, (4 * short, short))
    return normalize(image if size == (height, width) else resize_image(image, size))


def to_size(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) depth resized bilinearly to ``size`` (unchanged when it has it)."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    shape = depth.shape
    flat = depth.reshape(-1, 1, *shape[-2:])
    resized = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return resized.reshape(*shape[:-2], *size)


def predict_image(
    model: IEDPModel,
    image: np.ndarray,
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Scores of an H×W×3 uint8 image at its own size: seg (K, H, W), depth (1, H, W) metres."""
    sample = {"image": model_input(image, model, config)}
    scores = predict_scores(model, sample, config, device, out_size=image.shape[:2], dtype=dtype)
    return scores if model.task == "seg" else to_size(scores, image.shape[:2])


SCORE_BUDGET = 2**25
"""Class scores (float32, 128 MiB) :func:`predict_labels` holds at once at an image's full size; above it the
scores are resized to the image in bands."""


def resized_argmax(scores: torch.Tensor, size: tuple[int, int], budget: int = SCORE_BUDGET) -> torch.Tensor:
    """(H, W) int32 argmax over classes of (K, h, w) scores bilinearly resized to ``size`` (as ``F.interpolate``
    with ``align_corners=False``), in bands of rows holding at most ``budget`` scores: the labels of resizing
    the whole map at once, in bounded memory and about the same time."""
    classes, width = scores.shape[0], size[1]
    rows = max(1, budget // (classes * width))
    # grid_sample's normalised pixel centres with border clamping are F.interpolate's source coordinates
    xs = (torch.arange(width, device=scores.device) + 0.5) / width * 2 - 1
    labels = torch.empty(size, dtype=torch.int32, device=scores.device)
    bands = range(0, size[0], rows)
    for top in tqdm(
        bands, desc="resizing class scores", leave=False, disable=None if len(bands) > 8 else True
    ):
        ys = (torch.arange(top, min(top + rows, size[0]), device=scores.device) + 0.5) / size[0] * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].to(scores.dtype)
        band = F.grid_sample(scores[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[top : top + rows] = band[0].argmax(dim=0)
    return labels


def predict_labels(
    model: IEDPModel,
    image: np.ndarray,
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(H, W) class indices of an H×W×3 uint8 image of any size: the argmax of :func:`predict_image`. When its
    K×H×W scores would exceed :data:`SCORE_BUDGET`, the views are combined at the model's input size and the
    scores resized to the image band by band (:func:`resized_argmax`); with one view that is the same map."""
    height, width = image.shape[:2]
    if model.num_classes * height * width <= SCORE_BUDGET:
        return predict_image(model, image, config, device, dtype).argmax(dim=0)
    sample = {"image": model_input(image, model, config)}
    scores = predict_scores(
        model, sample, config, device, out_size=tuple(sample["image"].shape[-2:]), dtype=dtype
    )
    return resized_argmax(scores, (height, width))


@torch.no_grad()
def class_attention(
    model: IEDPModel,
    image: np.ndarray,
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(C, H, W) class cross-attention maps of a segmentation model for an H×W×3 image: the maps the backbone
    captures at its finest map stride (heads and layers averaged), over the same windows as the
    prediction, bilinearly resized to the image."""
    backbone = model.backbone
    if not backbone.map_strides:  # captured only where the class tokens lead the context (segmentation)
        raise ValueError("class attention maps need a segmentation model with model.attention_maps=true")
    stride = min(backbone.map_strides)
    captured: dict[str, torch.Tensor] = {}

    def keep_maps(_module, _args, output):
        captured["maps"] = output.class_attention[stride]

    predict = model_predictor(model, {}, device)

    def maps(images: torch.Tensor) -> torch.Tensor:
        predict(images)
        return F.interpolate(captured.pop("maps").float(), size=images.shape[-2:], mode="bilinear")

    tensor = model_input(image, model, config)[None].to(device)
    hook = backbone.register_forward_hook(keep_maps)
    try:
        with autocast(device, dtype):
            result = sliding_window(
                maps,
                tensor,
                config.eval.window,
                config.eval.stride,
                backbone.input_multiple,
                config.eval.batch_size,
            )
    finally:
        hook.remove()
    return F.interpolate(result, size=image.shape[:2], mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def predict_batch(
    model: IEDPModel,
    images: list[np.ndarray],
    config: Config,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Scores of N same-size H×W×3 uint8 images (video frames) in shared passes: seg (N, K, H, W), depth
    (N, 1, H, W). The protocol of :func:`predict_scores`; only the batching of windows differs."""
    sizes = {image.shape for image in images}
    if len(sizes) != 1:
        raise ValueError(f"predict_batch needs images of one size, got {sorted(sizes)}")
    ec = config.eval
    multiple = model.backbone.input_multiple
    batch = torch.stack([model_input(image, model, config) for image in images]).to(device)
    predict = model_predictor(model, {}, device)
    with autocast(device, dtype):
        if model.task == "seg":
            scales = ec.scales if ec.multi_scale else (1.0,)
            return segment(
                predict,
                batch,
                images[0].shape[:2],
                ec.window,
                ec.stride,
                multiple,
                scales=scales,
                flip=ec.multi_scale,
                batch_size=ec.batch_size * len(images),
            ).float()
        depth = estimate_depth(
            predict, batch, ec.depth_window, ec.depth_stride, multiple, ec.flip, ec.batch_size * len(images)
        )
    return to_size(depth.float(), images[0].shape[:2])
