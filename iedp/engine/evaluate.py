"""Evaluation of a model on a validation/test set, sharded over processes, metrics summed across them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from iedp.checkpoint import load_model
from iedp.config import Config, apply_overrides
from iedp.data.images import write_depth_png
from iedp.engine.data import build_dataset
from iedp.engine.inference import estimate_depth, segment
from iedp.metrics.depth import DepthMetric
from iedp.metrics.segmentation import SegmentationMetric
from iedp.models.iedp import IEDPModel

logger = logging.getLogger(__name__)


def model_predictor(model: IEDPModel, sample: dict, device: torch.device):
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
def predict_sample(
    model: IEDPModel, sample: dict, config: Config, device: torch.device, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Seg: label map (H, W) at ``out_size`` (default: the ground truth's size); depth: metres at the image's size."""
    ec = config.eval
    multiple = model.backbone.input_multiple
    image = sample["image"][None].to(device)
    predict = model_predictor(model, sample, device)
    if model.task == "seg":
        scales = ec.scales if ec.multi_scale else (1.0,)
        scores = segment(
            predict,
            image,
            out_size or tuple(sample["label"].shape[-2:]),
            ec.window,
            ec.stride,
            multiple,
            scales=scales,
            flip=ec.multi_scale,
            batch_size=ec.batch_size,
        )
        return scores[0].argmax(dim=0)
    depth = estimate_depth(predict, image, ec.depth_window, ec.depth_stride, multiple, ec.flip, ec.batch_size)
    return depth[0, 0]


def save_prediction(prediction: torch.Tensor, name: str, task: str, out_dir: Path, label_offset: int) -> None:
    """Write one prediction in the format ``iedp score`` reads: label PNGs in the dataset's convention (ADE20K:
    1..150) or uint16 millimetre depth PNGs."""
    if task == "seg":
        labels = prediction.cpu().numpy().astype(np.int64) + label_offset
        Image.fromarray(labels.astype(np.uint8)).save(out_dir / f"{name}.png")
    else:
        write_depth_png(out_dir / f"{name}.png", prediction.cpu().numpy())


def evaluate_model(
    model: IEDPModel,
    dataset: Dataset,
    config: Config,
    accelerator: Accelerator,
    save_predictions: str | Path | None = None,
) -> dict:
    """Metrics over ``dataset`` (every process takes every n-th sample; the metric sums are all-reduced)."""
    was_training = model.training
    model.eval()
    count = len(dataset) if config.data.max_val is None else min(len(dataset), config.data.max_val)
    indices = range(accelerator.process_index, count, accelerator.num_processes)
    if model.task == "seg":
        metric = SegmentationMetric(model.num_classes, model.class_names)
    else:
        metric = DepthMetric(crop=config.eval.depth_crop, max_depth=config.model.max_depth)
    out_dir = Path(save_predictions) if save_predictions else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    label_offset = 1 if config.data.dataset == "ade20k" else 0
    for index in tqdm(indices, desc="evaluate", disable=not accelerator.is_local_main_process, leave=False):
        sample = dataset[index]
        with accelerator.autocast():
            prediction = predict_sample(model, sample, config, accelerator.device)
        if model.task == "seg":
            metric.update(prediction.cpu(), sample["label"])
        else:
            metric.update(prediction.cpu(), sample["depth"][0])
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
) -> dict:
    """``iedp evaluate``: the checkpoint's own config (data, eval), changed by ``--set`` overrides."""
    model, config = load_model(checkpoint)
    config = apply_overrides(config, [*overrides, *(["eval.multi_scale=true"] if multi_scale else [])])
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision)
    model.to(accelerator.device)
    dataset = build_dataset(config, "val")
    metrics = evaluate_model(model, dataset, config, accelerator, save_predictions)
    if accelerator.is_main_process:
        print(format_metrics(metrics, model.task))
        path = Path(json_path) if json_path else Path(checkpoint) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"checkpoint": str(checkpoint), "config": config.to_dict(), "metrics": metrics}, indent=2)
        )
        logger.info("metrics written to %s", path)
    return metrics


def format_metrics(metrics: dict, task: str) -> str:
    """A small plain-text table of the summary metrics."""
    keys = (
        ("mIoU", "mAcc", "aAcc")
        if task == "seg"
        else ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
    )
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {metrics[k]:.4f}" for k in keys if k in metrics)
