"""The sample dict of one labelled image (segmentation) or one frame with depth, shared by the datasets of real
files: the seeded training augmentation (per seed, epoch and index) or the evaluation transform, and the prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from iedp.data.images import IGNORE_INDEX
from iedp.data.prompts import scene_prompt, seg_prompt
from iedp.data.transforms import depth_test_transform, seg_val_transform

Augmentation = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class _Augmented(Protocol):
    augment: bool
    seed: int
    epoch: int
    transform: Augmentation


class SegSource(_Augmented, Protocol):
    """What :func:`seg_sample` reads of a segmentation dataset (ADE20K, Cityscapes, your own folders)."""

    val_scale: tuple[int, int]
    class_names: Sequence[str]


class DepthSource(_Augmented, Protocol):
    """What :func:`depth_sample` reads of a depth dataset (NYUv2, KITTI, your own folders)."""

    scenes: Sequence[str]
    scene_names: Sequence[str]


def seg_sample(
    dataset: SegSource, index: int, image: np.ndarray, label: np.ndarray, name: str
) -> dict[str, torch.Tensor | str]:
    """One segmentation sample of a labelled-image dataset (ADE20K, Cityscapes, your own folders): the seeded
    training augmentation (per seed, epoch and index) or the validation resize, and the label prompt."""
    if dataset.augment:
        rng = np.random.default_rng((dataset.seed, dataset.epoch, index))
        image_tensor, label_tensor = dataset.transform(image, label, rng)
    else:
        image_tensor, label_tensor = seg_val_transform(image, label, dataset.val_scale)
    return {
        "image": image_tensor,
        "label": label_tensor,
        "prompt": seg_prompt(label_tensor, dataset.class_names, IGNORE_INDEX),
        "name": name,
    }


def depth_sample(
    dataset: DepthSource, index: int, image: np.ndarray, depth: np.ndarray, name: str
) -> dict[str, torch.Tensor | str | int]:
    """One depth sample of a dataset of real frames (NYUv2, KITTI, your own folders): the seeded training
    augmentation (per seed, epoch and index) or the test transform, the frame's scene, its id (-1 when it is not
    one of the model's scenes) and its prompt."""
    if dataset.augment:
        rng = np.random.default_rng((dataset.seed, dataset.epoch, index))
        image_tensor, depth_tensor = dataset.transform(image, depth, rng)
    else:
        image_tensor, depth_tensor = depth_test_transform(image, depth)
    scene = dataset.scenes[index]
    return {
        "image": image_tensor,
        "depth": depth_tensor,
        "scene": scene,
        "scene_id": dataset.scene_names.index(scene) if scene in dataset.scene_names else -1,
        "prompt": scene_prompt(scene),
        "name": name,
    }
