"""Datasets beyond the paper's two benchmarks, built from the data section of a config: your own segmentation and
depth folders (:mod:`iedp.data.custom`), KITTI's Eigen split (:mod:`iedp.data.kitti`) and Cityscapes
(:mod:`iedp.data.cityscapes`). :func:`iedp.engine.data.build_dataset` hands these datasets here.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from iedp.classes import load_class_names
from iedp.config import Config
from iedp.data.cityscapes import Cityscapes
from iedp.data.custom import CustomDepth, CustomSegmentation
from iedp.data.kitti import KittiDepth
from iedp.data.transforms import CUTDEPTH_PROB, DepthTrainTransform, SegTrainTransform
from iedp.errors import InputError

FOLDER_DATASETS = {"custom_seg": "seg", "custom_depth": "depth", "kitti": "depth", "cityscapes": "seg"}
"""Dataset name -> the task it serves."""


def _folder(value: str | None, key: str, dataset: str, must_exist: bool = True) -> Path:
    if not value:
        raise InputError(f"{key}: required for data.dataset={dataset} (the dataset folder)")
    path = Path(value).expanduser()
    if must_exist and not path.is_dir():
        raise InputError(f"{key}: {path} is not a folder")
    return path


def locate(value: str, root: Path) -> Path:
    """A file named in the config: absolute, else relative to the working folder if it is there, else to root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or path.is_file() else root / path


def _crop(config: Config) -> tuple[int, int]:
    return (config.data.crop_size, config.data.crop_width or config.data.crop_size)


def _depth_transform(config: Config) -> DepthTrainTransform:
    data = config.data
    return DepthTrainTransform(
        crop_size=_crop(config),
        pad_multiple=data.pad_multiple,
        cutdepth_prob=CUTDEPTH_PROB if data.cutdepth else 0.0,
    )


def build_folder_dataset(config: Config, split: str, augment: bool) -> Dataset:
    """One of :data:`FOLDER_DATASETS` for ``split`` ("train" or "val")."""
    data, model = config.data, config.model
    task = FOLDER_DATASETS[data.dataset]
    if model.task != task:
        kind = "segmentation" if task == "seg" else "depth"
        raise InputError(f"data.dataset={data.dataset} is a {kind} set; set model.task={task}")
    if task == "seg" and any(side % 64 for side in _crop(config)):
        raise InputError(
            f"data.crop_size / data.crop_width: {_crop(config)} must be multiples of 64 (the UNet's input multiple)"
        )
    root = _folder(
        data.root, "data.root", data.dataset, must_exist=data.dataset != "kitti"
    )  # KITTI lists both
    names = load_class_names(model.classes)  # after the root: model.classes=dataset names a file in it
    scenes = data.scenes if data.scenes in (None, "folder") else locate(data.scenes, root)
    short = config.eval.short_side
    if data.dataset == "custom_seg":
        return CustomSegmentation(
            root,
            split,
            class_names=names,
            augment=augment,
            transform=SegTrainTransform(crop_size=_crop(config), base_scale=(4 * short, short)),
            reduce_zero_label=data.reduce_zero_label,
            ignore_value=data.ignore_index,
            seed=data.seed,
            val_scale=(4 * short, short),
        )
    if data.dataset == "cityscapes":
        return Cityscapes(
            root,
            split,
            augment=augment,
            transform=SegTrainTransform(crop_size=_crop(config), base_scale=(2048, 1024)),
            class_names=names,
            seed=data.seed,
            val_scale=(4 * short, short),
        )
    if data.dataset == "custom_depth":
        return CustomDepth(
            root,
            split,
            scene_names=names,
            scenes=scenes,
            depth_scale=data.depth_scale,
            augment=augment,
            transform=_depth_transform(config),
            seed=data.seed,
        )
    list_key = "train_list" if split == "train" else "test_list"
    list_file = getattr(data, list_key)
    if not list_file:
        raise InputError(f"data.{list_key}: required for data.dataset=kitti (a BTS split list)")
    return KittiDepth(
        root,
        _folder(data.depth_root, "data.depth_root", "kitti", must_exist=False),
        locate(list_file, root),
        augment=augment,
        transform=_depth_transform(config),
        scene_names=names,
        scenes=scenes,
        seed=data.seed,
    )
