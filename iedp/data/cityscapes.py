"""Cityscapes semantic segmentation: the 19 evaluated classes as trainIds, 255 = ignore.

Layout under ``data.root`` (the official download, after ``createTrainIdLabelImgs.py`` of cityscapesScripts)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from iedp.data.folders import raise_if_problems
from iedp.data.images import check_same_size, read_label, read_rgb
from iedp.data.samples import seg_sample
from iedp.data.transforms import SegTrainTransform
from iedp.resources import read_names

SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
NUM_CLASSES = 19


def list_pairs(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image, trainId label) pairs of a split, sorted, and one problem per file without its partner."""
    if split not in SPLITS:
        return [], [f"Cityscapes split {split!r} is not one of {', '.join(SPLITS)}"]
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    problems = [
        f"{d}: folder not found (expected the Cityscapes layout)"
        for d in (image_dir, label_dir)
        if not d.is_dir()
    ]
    if problems:
        return [], problems
    images = {
        p.relative_to(image_dir).as_posix().removesuffix(IMAGE_SUFFIX): p
        for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")
    }
    labels = {
        p.relative_to(label_dir).as_posix().removesuffix(LABEL_SUFFIX): p
        for p in label_dir.glob(f"*/*{LABEL_SUFFIX}")
    }
    if not images:
        problems.append(f"{image_dir}: no <city>/*{IMAGE_SUFFIX} images")
    for key in sorted(images.keys() - labels.keys()):
        expected = label_dir / f"{key}{LABEL_SUFFIX}"
        hint = (
            " (labelIds found: make trainIds with cityscapesscripts' createTrainIdLabelImgs.py)"
            if expected.with_name(expected.name.replace("labelTrainIds", "labelIds")).is_file()
            else ""
        )
        problems.append(f"{images[key]}: no label map {expected}{hint}")
    for key in sorted(labels.keys() - images.keys()):
        problems.append(f"{labels[key]}: no image {image_dir / key}{IMAGE_SUFFIX} for this label map")
    return [(images[k], labels[k]) for k in sorted(images.keys() & labels.keys())], problems


class Cityscapes(Dataset):
    """Cityscapes fine annotations (module docstring) as sample dicts like :class:`~iedp.data.ade20k.ADE20K`:
    ``image``, ``label`` (int64, 0..18, 255 = ignore), ``prompt``, ``name`` ("<city>_<seq>_<frame>").

    Training samples go through ``transform`` (mmseg's Cityscapes recipe: rescale of (2048, 1024) by 0.5-2.0,
    crop, flip, photometric distortion); evaluation samples keep the full 1024 × 2048 frame (``val_scale``).
    Missing partners are raised together when the dataset is built; a label value other than 0..18 and 255 is an
    error naming the file when it is read.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        augment: bool | None = None,
        transform: SegTrainTransform | None = None,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        val_scale: tuple[int, int] = (4096, 1024),
    ) -> None:
        self.pairs, problems = list_pairs(Path(root), split)
        self.class_names = (
            list(class_names) if class_names is not None else read_names("cityscapes_classes.txt")
        )
        if len(self.class_names) != NUM_CLASSES:
            problems.append(
                f"model.classes: {len(self.class_names)} names, Cityscapes has {NUM_CLASSES} trainIds"
            )
        raise_if_problems(f"Cityscapes {root} ({split})", problems)
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self.transform = transform or SegTrainTransform(crop_size=(768, 768), base_scale=(2048, 1024))
        self.seed, self.epoch, self.val_scale = seed, 0, val_scale

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        label = read_label(label_path, NUM_CLASSES, reduce_zero_label=False)
        check_same_size(image, image_path, label, label_path)
        return seg_sample(self, index, image, label, image_path.name.removesuffix(IMAGE_SUFFIX))
