"""Datasets and loaders from the data section of a config."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from iedp.classes import load_class_names
from iedp.config import Config
from iedp.data.ade20k import ADE20K
from iedp.data.build import FOLDER_DATASETS, build_folder_dataset, locate
from iedp.data.nyu import LIST_FOLDERS, NYUDepthV2
from iedp.data.synthetic import SyntheticScenes
from iedp.data.transforms import CUTDEPTH_PROB, DepthTrainTransform, SegTrainTransform
from iedp.errors import InputError
from iedp.workers import usable_cores

logger = logging.getLogger(__name__)


def _require_root(config: Config) -> Path:
    if not config.data.root:
        raise InputError(f"data.root: required for data.dataset={config.data.dataset} (the dataset folder)")
    root = Path(config.data.root).expanduser()
    if not root.is_dir():
        raise InputError(f"data.root: {root} is not a folder")
    return root


def build_dataset(config: Config, split: str, augment: bool | None = None) -> Dataset:
    """``split`` is "train" or "val" (the validation / official test split); ``augment`` None: the config's
    choice for the training split (``iedp data check`` reads training samples un-augmented with False)."""
    data, model = config.data, config.model
    train = split == "train"
    augment = train and data.augment if augment is None else augment
    if train and not data.augment and data.dataset != "synthetic":
        raise InputError(
            "data.augment=false is for synthetic scenes only (real training images need their crops)"
        )
    if data.dataset in FOLDER_DATASETS:
        return build_folder_dataset(config, split, augment)
    names = load_class_names(model.classes)
    if data.dataset == "synthetic":
        return SyntheticScenes(
            task=model.task,
            split=split,
            size=data.num_train if train else data.num_val,
            resolution=data.resolution,
            seed=data.seed,
            augment=augment,
            cutdepth=data.cutdepth,
        )
    if data.dataset == "ade20k":
        if model.task != "seg":
            raise InputError("data.dataset=ade20k is a segmentation set; set model.task=seg")
        crop = (data.crop_size, data.crop_size)
        return ADE20K(
            _require_root(config),
            "training" if train else "validation",
            augment=augment,
            transform=SegTrainTransform(crop_size=crop),
            num_classes=len(names),
            class_names=names,
            seed=data.seed,
            skip_bad=data.skip_bad and train,
            val_scale=(4 * config.eval.short_side, config.eval.short_side),
        )
    if model.task != "depth":
        raise InputError("data.dataset=nyu is a depth set; set model.task=depth")
    root = _require_root(config)
    list_file = data.train_list if train else data.test_list
    if not list_file:
        raise InputError(f"data.{'train_list' if train else 'test_list'}: required for data.dataset=nyu")
    path = locate(list_file, root)
    return NYUDepthV2(
        root,
        path,
        augment=augment,
        scene_names=names,
        seed=data.seed,
        folders=LIST_FOLDERS["train" if train else "test"],
        transform=DepthTrainTransform(
            crop_size=(data.crop_size, data.crop_size),
            pad_multiple=data.pad_multiple,
            cutdepth_prob=CUTDEPTH_PROB if data.cutdepth else 0.0,
        ),
    )


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep strings as lists; ints become a tensor."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int) -> DataLoader:
    cores = usable_cores()
    if num_workers > cores:
        # said once here, instead of PyTorch's multi-line warning at every epoch's iterator (and Accelerate's copy)
        logger.warning(
            "data.num_workers=%d is more than the %d CPU cores this process may use", num_workers, cores
        )
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
