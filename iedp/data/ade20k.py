"""ADE20K (ADEChallengeData2016 layout, DESIGN §4) as a map-style dataset of sample dicts."""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from iedp.data.images import check_same_size, read_label, read_rgb
from iedp.data.samples import seg_sample
from iedp.data.transforms import SegTrainTransform
from iedp.errors import InputError
from iedp.resources import read_names

logger = logging.getLogger(__name__)

ADE20K_SPLITS = ("training", "validation")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


def list_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of a split, sorted by stem; every image must have its annotation."""
    if split not in ADE20K_SPLITS:
        raise InputError(f"ADE20K split {split!r} is not one of {', '.join(ADE20K_SPLITS)}")
    image_dir = Path(root) / "images" / split
    label_dir = Path(root) / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found (expected the ADEChallengeData2016 layout)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{image_dir}: no .jpg images")
    pairs = [(image, label_dir / f"{image.stem}.png") for image in images]
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        raise InputError(
            f"{missing[0]}: annotation not found for image {missing[0].stem}"
            + (f" ({len(missing)} annotations missing in {label_dir})" if len(missing) > 1 else "")
        )
    return pairs


class ADE20K(Dataset):
    """ADE20K scene parsing: ``root/images/{split}/*.jpg`` with ``root/annotations/{split}/*.png``.

    Each sample is a dict:

    - ``image``: float32 3×H×W in [-1, 1];
    - ``label``: int64 H×W, classes 0..149 and 255 = ignore (raw 0, "other", and padding);
    - ``prompt``: the explicit-branch prompt from the classes present in ``label``;
    - ``name``: the file stem.

    With ``augment`` (default: on for "training") the image and label are the 512×512 crop of
    :class:`~iedp.data.transforms.SegTrainTransform`. Without it (evaluation) the image is
    rescaled so its short side is 512 (mmseg's (2048, 512) rule, ``val_scale``) while ``label`` keeps the
    original size, because metrics are computed at the original resolution.

    Augmentation draws from ``numpy.random.default_rng((seed, epoch, index))``: the same sample
    is identical across runs, and :meth:`set_epoch` gives new crops each epoch (DataLoader workers
    receive the updated epoch when they are re-created at each epoch, the default).

    With ``skip_bad`` a corrupt file does not stop training: the next index is returned instead
    and the sample is recorded in :attr:`skipped` (image path → reason naming the bad file). Each DataLoader worker keeps its
    own copy of :attr:`skipped`, so each returned sample also carries ``skipped``: the ``(path, reason)`` pairs
    skipped to reach it, which the training loop gathers from every worker for its summary at the end.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        augment: bool | None = None,
        transform: SegTrainTransform | None = None,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        val_scale: tuple[int, int] = (2048, 512),
    ) -> None:
        self.pairs = list_pairs(root, split)
        self.split = split
        self.augment = split == "training" if augment is None else augment
        self.transform = transform or SegTrainTransform()
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.class_names = list(class_names) if class_names is not None else read_names("ade20k_classes.txt")
        if len(self.class_names) != num_classes:
            raise InputError(
                f"class_names has {len(self.class_names)} entries but num_classes is {num_classes}"
            )
        self.seed = seed
        self.epoch = 0
        self.skip_bad = skip_bad
        self.val_scale = val_scale
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        skipped_here: list[tuple[str, str]] = []
        for offset in range(len(self.pairs)):
            current = (index + offset) % len(self.pairs)
            try:
                sample = self._load(current)
            except InputError as err:
                if not self.skip_bad:
                    raise
                self.skipped[str(self.pairs[current][0])] = str(err)
                skipped_here.append((str(self.pairs[current][0]), str(err)))
                logger.warning("skipping a bad ADE20K sample (%d skipped so far): %s", len(self.skipped), err)
                continue
            if self.skip_bad:
                sample["skipped"] = skipped_here
            return sample
        raise InputError(f"{self.pairs[0][0].parent}: every sample failed to load")

    def _load(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        label = read_label(label_path, self.num_classes, self.reduce_zero_label)
        check_same_size(image, image_path, label, label_path)
        return seg_sample(self, index, image, label, image_path.stem)
