"""Evaluation of a model on a validation/test set, sharded over processes, metrics summed across them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from iedp.config import Config
from iedp.data.images import write_depth_png
from iedp.engine.data import build_dataset
from iedp.engine.inference import for_inference, predict_sample, resolve_device, resolve_dtype
from iedp.errors import InputError
from iedp.metrics.depth import EIGEN_CROP_SIZE
from iedp.model_files import load_model
from iedp.models.iedp import IEDPModel
from iedp.models.tasks import TASKS
from iedp.outputs import json_text

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_prediction(prediction: torch.Tensor, name: str, task: str, out_dir: Path, label_offset: int) -> None:
    """Write one prediction in the format ``iedp score`` reads: label PNGs in the dataset's convention (ADE20K:
    1..150) or uint16 millimetre depth PNGs."""
    if task == "seg":
        labels = prediction.cpu().numpy().astype(np.int64) + label_offset
        Image.fromarray(labels.astype(np.uint8)).save(out_dir / f"{name}.png")
    else:
        write_depth_png(out_dir / f"{name}.png", prediction.cpu().numpy())


def check_depth_crop(config: Config, dataset: Dataset) -> None:
    """``eval.depth_crop=eigen`` is defined on NYUv2's 480x640 frames only: a validation set of other sizes is
    refused before the work starts, not at its first evaluation (or a training run's, thousands of steps in)."""
    if config.model.task != "depth" or config.eval.depth_crop != "eigen" or len(dataset) == 0:
        return
    sample = dataset[0]
    size = tuple(sample["depth"].shape[-2:])
    if size != EIGEN_CROP_SIZE:
        raise InputError(
            f"eval.depth_crop=eigen: it is defined on NYUv2's 480x640 frames, but {sample['name']} is "
            f"{size[0]}x{size[1]}; set eval.depth_crop=none (or garg for KITTI)"
        )


def evaluate_model(
    model: IEDPModel,
    dataset: Dataset,
    config: Config,
    accelerator: Accelerator,
    save_predictions: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Metrics over ``dataset`` (every process takes every n-th sample; the metric sums are all-reduced).

    ``dtype``: the inference precision (:func:`~iedp.engine.inference.resolve_dtype`); default: the autocast of
    the accelerator's mixed precision, as during training."""
    was_training = model.training
    model.eval()
    count = len(dataset) if config.data.max_val is None else min(len(dataset), config.data.max_val)
    indices = range(accelerator.process_index, count, accelerator.num_processes)
    task = TASKS[model.task]
    metric = task.metric(model.class_names, config)
    out_dir = Path(save_predictions) if save_predictions else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    label_offset = 1 if config.data.dataset == "ade20k" else 0
    if dtype is None:
        dtype = MIXED_PRECISION[accelerator.mixed_precision]
    device = next(model.parameters()).device
    for index in tqdm(indices, desc="evaluate", disable=not accelerator.is_local_main_process, leave=False):
        sample = dataset[index]
        prediction = predict_sample(model, sample, config, device, dtype=dtype)
        # the ground truth in the prediction's (H, W) shape: depth samples carry a channel axis
        metric.update(prediction.cpu(), sample[task.target].reshape(prediction.shape))
        if out_dir:
            save_prediction(prediction, sample["name"], model.task, out_dir, label_offset)
    state = {k: accelerator.reduce(v.to(accelerator.device), "sum").cpu() for k, v in metric.state().items()}
    metric.load_state(state)
    model.train(was_training)
    return metric.compute()


def evaluate_checkpoint(
    checkpoint: str | Path,
    overrides: list[str] = (),
    multi_scale: bool = False,
    save_predictions: str | None = None,
    json_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """``iedp evaluate``: the checkpoint's own config (data, eval), changed by ``--set`` overrides.

    ``device`` (default: the process's accelerator device) and ``dtype`` (default ``auto``: bf16 where the
    device runs it natively, a GPU with bf16 or a CPU with AVX512-BF16/AMX, else fp32;
    :func:`~iedp.engine.inference.resolve_dtype`) are resolved as ``iedp predict`` resolves them, so both
    score the same pictures."""
    from iedp.outputs import check_output_dir, check_output_file

    overrides = [*overrides, *(["eval.multi_scale=true"] if multi_scale else [])]
    model, config = load_model(checkpoint, overrides=overrides)
    if config.eval.multi_scale and model.task != "seg":
        raise InputError(
            "--multi-scale / eval.multi_scale: segmentation only; depth averages each window with its mirror image "
            "(eval.flip, on by default)"
        )
    # where results go is checked before the evaluation, not found unwritable after it
    check_output_file(json_path or Path(checkpoint) / "metrics.json", "--json")
    if save_predictions:
        check_output_dir(save_predictions, "--save-predictions")
    accelerator = Accelerator(cpu=device == "cpu")
    target = accelerator.device if device in (None, "auto", "cpu") else resolve_device(device)
    precision = resolve_dtype(dtype, target)
    for_inference(model, target, precision)
    dataset = build_dataset(config, "val")
    check_depth_crop(config, dataset)
    metrics = evaluate_model(model, dataset, config, accelerator, save_predictions, dtype=precision)
    if accelerator.is_main_process:
        print(format_metrics(metrics, model.task))
        path = Path(json_path) if json_path else Path(checkpoint) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json_text({"checkpoint": str(checkpoint), "config": config.to_dict(), "metrics": metrics})
        )
        logger.info("metrics written to %s", path)
    return metrics


def format_metrics(metrics: dict, task: str) -> str:
    """A small plain-text table of the summary metrics."""
    keys = TASKS[task].summary_metrics
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {metrics[k]:.4f}" for k in keys if k in metrics)
