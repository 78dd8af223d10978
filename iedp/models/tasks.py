"""The tasks, as a table: what differs between segmentation and depth lives in one entry each, not in branches.

An entry says how to build the head (its parts, applied in order to the feature pyramid), which loss compares the
prediction with which batch key, and what the UNet context holds (whether the class tokens lead it, and what
VPD's own branch adds). A new task (e.g. surface normals) is one entry here, one head file under
``models/heads/``, and its name in :data:`iedp.config.TASKS` (which checks recipes without importing torch; a test
keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iedp.config import ModelConfig
from iedp.models.guidance import no_tokens, scene_tokens
from iedp.models.heads.depth_head import build_depth_head
from iedp.models.heads.fpn_head import build_segmentation_head
from iedp.models.losses import segmentation_loss, silog_loss

# (config, strides fine to coarse, channels of each stride's feature, number of classes) -> the head's parts, by
# attribute name (these names are the checkpoints' weight prefixes), applied in order to the feature pyramid.
HeadBuilder = Callable[[ModelConfig, list[int], list[int], int], dict[str, nn.Module]]
# (class tokens (C, D), batch, batch size, device) -> (B, T, D) tokens of VPD's branch, or None.
VPDGuidance = Callable[[torch.Tensor, dict, int, torch.device], "torch.Tensor | None"]


@dataclass(frozen=True)
class Task:
    build_head: HeadBuilder
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction, target) -> scalar
    target: str  # the batch key holding the ground truth the loss reads
    class_tokens_lead: bool  # every context starts with the C class tokens (their attention maps can be captured)
    vpd_guidance: VPDGuidance  # what VPD's branch adds to the context
    card: tuple[str, str]  # model cards: (what it predicts, the Hugging Face pipeline tag)


TASKS: dict[str, Task] = {
    "seg": Task(
        build_head=build_segmentation_head,
        loss=segmentation_loss,
        target="label",
        class_tokens_lead=True,
        vpd_guidance=no_tokens,  # VPD segmentation: the class tokens alone
        card=("semantic segmentation", "image-segmentation"),
    ),
    "depth": Task(
        build_head=build_depth_head,
        loss=silog_loss,
        target="depth",
        class_tokens_lead=False,  # the class tokens are scene tokens, read only by VPD's branch
        vpd_guidance=scene_tokens,
        card=("monocular depth estimation (metres)", "depth-estimation"),
    ),
}
