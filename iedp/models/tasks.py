"""The tasks, as a table: what differs between segmentation and depth lives in one entry each, not in branches.

An entry says how to build the head (its parts, applied in order to the feature pyramid), which loss compares the
prediction with which batch key, and what the UNet context holds (whether the class tokens lead it, and what
VPD's own branch adds); then how the task trains (VPD's parameter-group rule, SyncBatchNorm on several GPUs)
and how it is scored (the prediction map from the scores, the streaming metric, its summary keys). A new task
(e.g. surface normals) is one entry here, one head file under ``models/heads/``, and its name in
:data:`iedp.config.TASKS` (which checks recipes without importing torch; a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iedp.config import Config, ModelConfig
from iedp.metrics.depth import DepthMetric
from iedp.metrics.segmentation import SegmentationMetric
from iedp.models.guidance import no_tokens, scene_tokens
from iedp.models.heads.depth_head import build_depth_head
from iedp.models.heads.fpn_head import build_segmentation_head
from iedp.models.losses import segmentation_loss, silog_loss

# (config, strides fine to coarse, channels of each stride's feature, number of classes) -> the head's parts, by
# attribute name (these names are the checkpoints' weight prefixes), applied in order to the feature pyramid.
HeadBuilder = Callable[[ModelConfig, list[int], list[int], int], dict[str, nn.Module]]
# (class tokens (C, D), batch, batch size, device) -> (B, T, D) tokens of VPD's branch, or None.
VPDGuidance = Callable[[torch.Tensor, dict, int, torch.device], "torch.Tensor | None"]
# (class names, the run's config) -> an empty streaming metric (update with prediction and target, compute).
MetricBuilder = Callable[[list[str], Config], "SegmentationMetric | DepthMetric"]


def class_labels(scores: torch.Tensor) -> torch.Tensor:
    """(K, H, W) class scores -> (H, W) label map."""
    return scores.argmax(dim=0)


def depth_map(scores: torch.Tensor) -> torch.Tensor:
    """(1, H, W) metres -> (H, W)."""
    return scores[0]


def segmentation_metric(class_names: list[str], config: Config) -> SegmentationMetric:
    return SegmentationMetric(len(class_names), class_names)


def depth_metric(class_names: list[str], config: Config) -> DepthMetric:
    return DepthMetric(crop=config.eval.depth_crop, max_depth=config.model.max_depth)


@dataclass(frozen=True)
class Task:
    build_head: HeadBuilder
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction, target) -> scalar
    target: str  # the batch key holding the ground truth the loss reads
    class_tokens_lead: bool  # every context starts with the C class tokens (their maps can be captured)
    vpd_guidance: VPDGuidance  # what VPD's branch adds to the context
    card: tuple[str, str]  # model cards: (what it predicts, the Hugging Face pipeline tag)
    param_rule: str  # VPD's parameter groups for the task (iedp.engine.optim.parameter_groups: mmseg | ldm)
    sync_batchnorm: bool  # SyncBatchNorm in the heads when training on several GPUs
    to_map: Callable[[torch.Tensor], torch.Tensor]  # one image's scores -> its (H, W) prediction
    metric: MetricBuilder
    summary_metrics: tuple[str, ...]  # the keys of metric.compute() that tables and model cards show


TASKS: dict[str, Task] = {
    "seg": Task(
        build_head=build_segmentation_head,
        loss=segmentation_loss,
        target="label",
        class_tokens_lead=True,
        vpd_guidance=no_tokens,  # VPD segmentation: the class tokens alone
        card=("semantic segmentation", "image-segmentation"),
        param_rule="mmseg",
        sync_batchnorm=True,  # VPD's mmseg config
        to_map=class_labels,
        metric=segmentation_metric,
        summary_metrics=("mIoU", "mAcc", "aAcc"),
    ),
    "depth": Task(
        build_head=build_depth_head,
        loss=silog_loss,
        target="depth",
        class_tokens_lead=False,  # the class tokens are scene tokens, read only by VPD's branch
        vpd_guidance=scene_tokens,
        card=("monocular depth estimation (metres)", "depth-estimation"),
        param_rule="ldm",
        sync_batchnorm=False,  # VPD's depth model: each GPU normalises its own share of the batch
        to_map=depth_map,
        metric=depth_metric,
        summary_metrics=("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"),
    ),
}
