"""KITTI depth, Eigen split, in BTS's layout, read through BTS's split lists unchanged.

- ``data.root``: the KITTI raw root, ``2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png``;
- ``data.depth_root``: the annotated depth (KITTI's ``data_depth_annotated``),
  ``2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png``: uint16 PNG of metres × 256,
  0 = no measurement. Drives may also sit under its ``train/`` and ``val/`` folders, as the download unpacks;
- list lines ``raw_rel_path depth_rel_path focal``. BTS's test list writes ``None`` where a frame has no annotated
  depth; those frames are skipped (BTS and its successors evaluate the 652 of 697 Eigen test frames that have one).

Frames are cropped to the KITTI benchmark size 352 × 1216 (bottom rows, centred columns; "kb crop") for training
and evaluation alike, as GLPDepth's ``dataset/kitti.py`` does; training then takes random 352 × 704 crops.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from iedp.data.folders import raise_if_problems, read_depth, read_scene_table, scene_problems
from iedp.data.images import check_same_size, read_rgb
from iedp.data.samples import depth_sample
from iedp.data.transforms import DepthTrainTransform
from iedp.errors import InputError

logger = logging.getLogger(__name__)

KB_CROP = (352, 1216)
"""KITTI benchmark crop (height, width): the bottom 352 rows, the centred 1216 columns."""
KITTI_DEPTH_SCALE = 256.0
"""Annotated depth PNGs store metres × 256."""
DEPTH_FOLDERS = ("", "train", "val")
"""Where a depth path of a list is looked up under ``data.depth_root``."""
_DRIVE = re.compile(r"\d{4}_\d{2}_\d{2}_drive_\d{4}(_sync)?")


def kb_crop_box(height: int, width: int, size: tuple[int, int] = KB_CROP) -> tuple[slice, slice]:
    """Rows and columns of the benchmark crop: top = H - 352, left = (W - 1216) // 2 (BTS, GLPDepth)."""
    if height < size[0] or width < size[1]:
        raise ValueError(f"a {height}x{width} frame is smaller than the {size[0]}x{size[1]} benchmark crop")
    top, left = height - size[0], (width - size[1]) // 2
    return slice(top, top + size[0]), slice(left, left + size[1])


@dataclass(frozen=True)
class KittiEntry:
    """One list line: the RGB frame, its annotated depth, the drive and the line number."""

    rgb: Path
    depth: Path
    drive: str
    line: int


def drive_of(path: str) -> str:
    """The drive folder named in a path ("2011_09_26_drive_0002_sync"), or "" if none."""
    match = _DRIVE.search(path)
    return match.group(0) if match else ""


def read_bts_list(list_file: Path, root: Path, depth_root: Path) -> tuple[list[KittiEntry], int, list[str]]:
    """Parse BTS list lines ``raw_rel depth_rel [focal]``: the entries whose files exist, the number of lines
    without depth (``None``), and one problem per malformed line or missing file (all of them)."""
    if not list_file.is_file():
        return [], 0, [f"{list_file}: list file not found"]
    entries, without_depth, problems = [], 0, []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        columns = line.split()
        if not columns:
            continue
        where = f"{list_file}, line {number}"
        if len(columns) not in (2, 3):
            problems.append(f"{where}: expected 'raw_rel_path depth_rel_path focal', got {line.strip()!r}")
            continue
        if columns[1] == "None":
            without_depth += 1
            continue
        rgb = root / columns[0].lstrip("/")
        tried = [depth_root / folder / columns[1].lstrip("/") for folder in DEPTH_FOLDERS]
        depth = next((p for p in tried if p.is_file()), None)
        if not rgb.is_file():
            problems.append(f"{where}: image not found: {rgb}")
        if depth is None:
            problems.append(
                f"{where}: depth not found: {tried[0]} (nor under train/ or val/ of data.depth_root)"
            )
        if rgb.is_file() and depth is not None:
            entries.append(KittiEntry(rgb, depth, drive_of(columns[0]), number))
    if not entries and not problems:
        problems.append(f"{list_file}: no lines with a depth map")
    return entries, without_depth, problems


class KittiDepth(Dataset):
    """KITTI frames named by a BTS list (module docstring), as sample dicts like :class:`~iedp.data.nyu.NYUDepthV2`:
    ``image``, ``depth`` (float32 1×352×1216 metres, 0 = none; training: the ``transform``'s crop), ``scene``,
    ``scene_id``, ``prompt``, ``name`` ("<drive>_<camera>_<frame>").

    ``scenes`` optionally names a CSV of ``drive,category`` lines (the drive with or without ``_sync``, the category
    one of ``scene_names``: city, residential, road, campus, person); the prompt is then "a photo of a {category}".
    Missing files and malformed lines of the whole list are raised together.
    """

    def __init__(
        self,
        root: str | Path,
        depth_root: str | Path,
        list_file: str | Path,
        augment: bool = False,
        transform: DepthTrainTransform | None = None,
        scene_names: Sequence[str] = (),
        scenes: str | Path | None = None,
        seed: int = 0,
        crop: tuple[int, int] = KB_CROP,
    ) -> None:
        root, depth_root, list_file = Path(root), Path(depth_root), Path(list_file)
        problems = [f"{d}: folder not found" for d in (root, depth_root) if not d.is_dir()]
        self.entries, self.without_depth, list_problems = read_bts_list(list_file, root, depth_root)
        problems += list_problems
        self.augment = augment
        self.transform = transform or DepthTrainTransform(crop_size=(352, 704))
        self.scene_names = list(scene_names)
        self.crop = crop
        self.seed, self.epoch = seed, 0
        table = {}
        if scenes is not None:
            table, table_problems = read_scene_table(Path(scenes))
            table = {key.removesuffix("_sync"): value for key, value in table.items()}
            problems += table_problems + scene_problems(table, self.scene_names, f"data.scenes={scenes}")
        self.scenes = [table.get(entry.drive.removesuffix("_sync"), "") for entry in self.entries]
        raise_if_problems(f"KITTI list {list_file}", problems)
        if self.without_depth:
            logger.info("%s: %d lines without depth (None) skipped", list_file, self.without_depth)

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        entry = self.entries[index]
        image = read_rgb(entry.rgb)
        depth = read_depth(entry.depth, KITTI_DEPTH_SCALE)
        check_same_size(image, entry.rgb, depth, entry.depth)
        try:
            box = kb_crop_box(*depth.shape, self.crop)
        except ValueError as err:
            raise InputError(f"{entry.rgb}: {err}") from None
        image, depth = image[box], depth[box]
        camera = entry.rgb.parent.parent.name
        name = f"{entry.drive or entry.rgb.parent.parent.parent.name}_{camera}_{entry.rgb.stem}"
        return depth_sample(self, index, image, depth, name)
