"""Your own data: a segmentation folder and a depth folder, each validated as a whole before training.

Segmentation (``data.dataset=custom_seg``)::

    root/classes.txt                 one class name per line (the class tokens and the explicit prompts)
    root/palette.txt                 optional: "R G B" per class, in classes.txt order, for colour label maps;
                                     lines "ignore R G B" name colours that mark unlabelled pixels
    root/images/{train,val}/**/*.jpg|.png
    root/labels/{train,val}/**/*.png same relative path and stem as the image

Label maps hold class indices (8- or 16-bit PNG): 0..N-1 for the N names of classes.txt, or 1..N with
``data.reduce_zero_label`` (0 is then "unlabelled", as ADE20K); ``data.ignore_index`` (default 255) marks pixels
without a label. With a palette.txt, RGB label maps are read by colour instead.

Depth (``data.dataset=custom_depth``)::

    root/scenes.txt                  optional: the scene names (the scene tokens and "a photo of a {scene}")
    root/images/{train,val}/**/*.jpg|.png
    root/depth/{train,val}/**/*.png|.npy|.tif   same relative path and stem as the image

uint16 PNGs are divided by ``data.depth_scale`` (1000: millimetres; 256: KITTI style), ``.npy`` and ``.tif`` hold
float32 metres; 0 (or non-finite) means no measurement. ``data.scenes`` gives each image a scene: ``folder`` (the
first folder under ``images/<split>/``) or a CSV of ``image,scene`` lines (image: its path under
``images/<split>/`` without suffix, or its stem).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from iedp.data.folders import (
    DEPTH_SUFFIXES,
    IMAGE_SUFFIXES,
    depth_header,
    header,
    index_files,
    pair_by_name,
    raise_if_problems,
    read_depth,
    read_scene_table,
    scene_problems,
    size_problem,
)
from iedp.data.images import IGNORE_INDEX, _open_decoded, check_same_size, read_rgb
from iedp.data.samples import depth_sample, seg_sample
from iedp.data.transforms import DepthTrainTransform, SegTrainTransform
from iedp.errors import InputError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
CLASSES_FILE = "classes.txt"
PALETTE_FILE = "palette.txt"
SCENES_FILE = "scenes.txt"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def read_names_file(path: Path, what: str) -> tuple[list[str], list[str]]:
    """Non-empty, stripped lines of a name list, and its problems (missing, empty, duplicated names)."""
    if not path.is_file():
        return [], [f"{path}: {what} not found (one name per line)"]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        return [], [f"{path}: no names (one {what} name per line)"]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    return names, [f"{path}: duplicated names {', '.join(duplicated)}"] if duplicated else []


def read_palette(path: Path, num_classes: int) -> tuple[np.ndarray | None, np.ndarray, list[str]]:
    """palette.txt: (N×3 class colours or None when absent, K×3 ignore colours, problems)."""
    if not path.is_file():
        return None, np.zeros((0, 3), np.int64), []
    colours, ignore, problems = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        is_ignore = fields[0].lower() == "ignore"
        values = fields[1:] if is_ignore else fields
        try:
            rgb = [int(v) for v in values]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            problems.append(
                f"{path}, line {number}: expected 'R G B' (0..255) or 'ignore R G B', got {line.strip()!r}"
            )
            continue
        (ignore if is_ignore else colours).append(rgb)
    if not problems and len(colours) != num_classes:
        problems.append(
            f"{path}: {len(colours)} class colours for the {num_classes} classes of {CLASSES_FILE}"
        )
    palette = np.asarray(colours, np.int64).reshape(-1, 3)
    if not problems and len({tuple(c) for c in colours}) != len(colours):
        problems.append(f"{path}: two classes share a colour")
    return palette, np.asarray(ignore, np.int64).reshape(-1, 3), problems


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def convert_label(
    raw: np.ndarray,
    num_classes: int,
    reduce_zero_label: bool,
    ignore_value: int,
    palette: np.ndarray | None = None,
    ignore_colours: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """A stored label map as uint8 class indices 0..N-1 with 255 = ignore, and the stored values (or colours) that
    are neither a class nor ignored ("7", "(12, 40, 200)"), which are set to 255 too.

    Index maps (H×W): the declared ``ignore_value`` is ignored; with ``reduce_zero_label`` 0 is ignored and v is
    class v - 1. Colour maps (H×W×3) need ``palette`` (N×3): colour i is class i, ``ignore_colours`` are ignored.
    """
    if raw.ndim == 3:
        if palette is None:
            raise ValueError("a colour label map needs a palette")
        codes = _pack(raw[..., :3])
        label = np.full(codes.shape, IGNORE_INDEX, np.uint8)
        unknown = np.ones(codes.shape, bool)
        for index, code in enumerate(_pack(palette)):
            hit = codes == code
            label[hit], unknown[hit] = index, False
        for code in _pack(ignore_colours) if ignore_colours is not None else ():
            unknown[codes == code] = False
        bad = [f"({v >> 16}, {(v >> 8) & 255}, {v & 255})" for v in np.unique(codes[unknown])[:5].tolist()]
        return label, bad
    values = raw.astype(np.int64)
    ignored = values == ignore_value
    if reduce_zero_label:
        ignored |= values == 0
        values = values - 1
    outside = ~ignored & ((values < 0) | (values >= num_classes))
    bad_stored = np.unique(raw[outside])[:5].tolist()
    label = np.where(ignored | outside, IGNORE_INDEX, values).astype(np.uint8)
    return label, [str(v) for v in bad_stored]


def _decode_label(path: Path) -> np.ndarray:
    img, _ = _open_decoded(path)
    if img.mode in ("L", "P", "I;16", "I"):
        return np.asarray(img)
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"))
    raise InputError(f"{path}: label map of PNG mode {img.mode}; expected 8/16-bit indices or RGB colours")


class CustomSegmentation(Dataset):
    """Your own segmentation folder (module docstring), as sample dicts like :class:`~iedp.data.ade20k.ADE20K`:
    ``image`` float32 3×H×W in [-1, 1], ``label`` int64 H×W (0..N-1, 255 = ignore), ``prompt``, ``name``.

    The whole split is checked when the dataset is built: every image has its label map and every label map its
    image, sizes match, classes.txt agrees with ``class_names`` (``model.classes``), palette.txt is well formed and
    (with ``check_labels``) every label map holds only declared values. All problems are raised together as one
    :class:`~iedp.data.folders.DataProblems`.

    Training samples go through ``transform`` (:class:`~iedp.data.transforms.SegTrainTransform`); evaluation
    samples are rescaled into ``val_scale`` with the label at its original size.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        augment: bool | None = None,
        transform: SegTrainTransform | None = None,
        reduce_zero_label: bool = False,
        ignore_value: int = IGNORE_INDEX,
        seed: int = 0,
        val_scale: tuple[int, int] = (2048, 512),
        check_labels: bool = True,
    ) -> None:
        _check_split(split)
        root = Path(root)
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self.transform = transform or SegTrainTransform()
        self.reduce_zero_label = reduce_zero_label
        self.ignore_value = ignore_value
        self.seed, self.epoch, self.val_scale = seed, 0, val_scale

        names, problems = read_names_file(root / CLASSES_FILE, "class list")
        if class_names is not None and names and list(class_names) != names:
            problems.append(
                f"{root / CLASSES_FILE}: its {len(names)} names differ from model.classes ({len(class_names)} names); "
                "use model.classes=dataset to take them from the folder"
            )
        self.class_names = names or list(class_names or [])
        if len(self.class_names) > IGNORE_INDEX:
            problems.append(
                f"{root / CLASSES_FILE}: {len(self.class_names)} classes; at most {IGNORE_INDEX} are supported"
            )
        self.palette, self.ignore_colours, palette_problems = read_palette(
            root / PALETTE_FILE, len(self.class_names)
        )
        problems += palette_problems
        if not 0 <= ignore_value <= 65535:
            problems.append(f"data.ignore_index: {ignore_value} is not a label value (0..65535)")
        if reduce_zero_label and ignore_value == 0:
            problems.append("data.ignore_index: 0 is already ignored by data.reduce_zero_label; use 255")

        image_dir, label_dir = root / "images" / split, root / "labels" / split
        missing = [f"{d}: folder not found" for d in (image_dir, label_dir) if not d.is_dir()]
        self.items: list[tuple[str, Path, Path]] = []
        if not missing:
            images, labels = index_files(image_dir, IMAGE_SUFFIXES), index_files(label_dir, (".png",))
            if not images:
                missing.append(f"{image_dir}: no .jpg or .png images")
            self.items, pair_problems = pair_by_name(images, labels, image_dir, label_dir, "label map")
            problems += pair_problems
        problems += missing
        problems += self._file_problems(
            check_labels and bool(self.class_names), colours_ok=not palette_problems
        )
        raise_if_problems(f"segmentation data {root} ({split})", problems)

    def _file_problems(self, check_values: bool, colours_ok: bool) -> list[str]:
        """Header problems of every pair and, with ``check_values``, the values of every label map (colour maps
        only when palette.txt is sound)."""
        problems = []
        for _, image_path, label_path in self.items:
            image_info, label_info = header(image_path), header(label_path)
            bad = [info for info in (image_info, label_info) if isinstance(info, str)]
            if bad:
                problems += bad
                continue
            mismatch = size_problem(image_path, image_info[0], label_path, label_info[0])
            if mismatch:
                problems.append(mismatch)
            if check_values and (colours_ok or label_info[1] not in ("RGB", "RGBA")):
                try:
                    self._read_label(label_path)
                except InputError as err:
                    problems.append(str(err))
        return problems

    def _read_label(self, path: Path) -> np.ndarray:
        raw = _decode_label(path)
        if raw.ndim == 3 and self.palette is None:
            raise InputError(f"{path}: an RGB label map, but there is no {PALETTE_FILE} to read its colours")
        label, bad = convert_label(
            raw,
            len(self.class_names),
            self.reduce_zero_label,
            self.ignore_value,
            self.palette,
            self.ignore_colours,
        )
        if bad:
            if raw.ndim == 3:
                expected = f"the colours of {PALETTE_FILE}"
            elif self.reduce_zero_label:
                expected = f"1..{len(self.class_names)} (0 = unlabelled, reduce_zero_label)"
            else:
                expected = f"0..{len(self.class_names) - 1}"
            raise InputError(
                f"{path}: label values {', '.join(bad)} are not classes: expected {expected} "
                f"or the ignore value {self.ignore_value} ({len(self.class_names)} classes in {CLASSES_FILE})"
            )
        return label

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        key, image_path, label_path = self.items[index]
        image = read_rgb(image_path)
        label = self._read_label(label_path)
        check_same_size(image, image_path, label, label_path)
        return seg_sample(self, index, image, label, key.replace("/", "_"))


def scene_of(key: str, table: dict[str, str] | None) -> str:
    """The scene of the image at ``key`` (its path under ``images/<split>/`` without suffix): from the CSV
    ``table`` by key or stem, or, without a table, the first folder of the key; "" if none."""
    if table is None:
        return key.split("/", 1)[0] if "/" in key else ""
    return table.get(key) or table.get(key.rsplit("/", 1)[-1], "")


class CustomDepth(Dataset):
    """Your own depth folder (module docstring), as sample dicts like :class:`~iedp.data.nyu.NYUDepthV2`:
    ``image``, ``depth`` (float32 1×H×W metres, 0 = none), ``scene``, ``scene_id``, ``prompt``, ``name``.

    ``scenes`` is None (no scenes: every prompt is "a photo"), ``"folder"`` or the path of a CSV table;
    ``scene_names`` is the model's scene list (``model.classes``), which every scene must belong to. The split is
    checked as a whole when the dataset is built (partners, depth formats, sizes, scene names) and every problem
    is raised together.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        scene_names: Sequence[str] = (),
        scenes: str | Path | None = None,
        depth_scale: float = 1000.0,
        augment: bool | None = None,
        transform: DepthTrainTransform | None = None,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        root = Path(root)
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self.transform = transform or DepthTrainTransform()
        self.scene_names = list(scene_names)
        self.depth_scale = depth_scale
        self.seed, self.epoch = seed, 0
        problems = [] if depth_scale > 0 else [f"data.depth_scale: {depth_scale} must be positive"]

        image_dir, depth_dir = root / "images" / split, root / "depth" / split
        problems += [f"{d}: folder not found" for d in (image_dir, depth_dir) if not d.is_dir()]
        self.items: list[tuple[str, Path, Path]] = []
        if not problems:
            images, depths = index_files(image_dir, IMAGE_SUFFIXES), index_files(depth_dir, DEPTH_SUFFIXES)
            if not images:
                problems.append(f"{image_dir}: no .jpg or .png images")
            self.items, pair_problems = pair_by_name(images, depths, image_dir, depth_dir, "depth map")
            problems += pair_problems
        table = None
        if scenes is not None and str(scenes) != "folder":
            table, table_problems = read_scene_table(Path(scenes))
            problems += table_problems
        self.scenes = [scene_of(key, table) if scenes is not None else "" for key, _, _ in self.items]
        if scenes is not None:
            named = {key: scene for (key, _, _), scene in zip(self.items, self.scenes, strict=True) if scene}
            problems += scene_problems(named, self.scene_names, f"data.scenes={scenes}")
            unnamed = [key for (key, _, _), scene in zip(self.items, self.scenes, strict=True) if not scene]
            if unnamed:
                logger.warning(
                    "%s: %d of %d images have no scene (first: %s); their prompt is 'a photo'",
                    image_dir,
                    len(unnamed),
                    len(self.items),
                    unnamed[0],
                )
        for _, image_path, depth_path in self.items:
            image_info, depth_info = header(image_path), depth_header(depth_path)
            bad = [info for info in (image_info, depth_info) if isinstance(info, str)]
            problems += bad
            if not bad and (mismatch := size_problem(image_path, image_info[0], depth_path, depth_info[0])):
                problems.append(mismatch)
        raise_if_problems(f"depth data {root} ({split})", problems)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        key, image_path, depth_path = self.items[index]
        image = read_rgb(image_path)
        depth = read_depth(depth_path, self.depth_scale)
        check_same_size(image, image_path, depth, depth_path)
        return depth_sample(self, index, image, depth, key.replace("/", "_"))
