"""NYUv2 depth in the BTS / VPD / GLPDepth layout (DESIGN §4), read through list files."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from iedp.data.folders import raise_if_problems
from iedp.data.images import check_same_size, read_depth_png, read_rgb
from iedp.data.prompts import match_scene
from iedp.data.samples import depth_sample
from iedp.data.transforms import DepthTrainTransform
from iedp.errors import InputError
from iedp.resources import read_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListEntry:
    """One list-file line: where it came from and the two files it names."""

    rgb: Path
    depth: Path
    line: int


# Where BTS / VPD list files are relative to, under the NYUv2 root: training lines ("/kitchen_0028b/rgb_00045.jpg")
# to sync/, test lines ("bathroom/rgb_00045.jpg") to official_splits/test/. Each split looks in its own first.
LIST_FOLDERS = {"train": ("sync", "official_splits/test"), "test": ("official_splits/test", "sync")}


def _resolve(column: str, root: Path, folders: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """The file a list column names, and the places tried: the path as written when absolute, then under each
    of ``folders`` of ``root``, then under ``root`` itself (a leading "/" is read as relative there)."""
    relative = column.lstrip("/")
    candidates = [Path(column)] if Path(column).is_absolute() else []
    candidates += [root / folder / relative for folder in folders] + [root / relative]
    return next((c for c in candidates if c.is_file()), None), candidates


def read_list_file(list_file: str | Path, root: str | Path, folders: Sequence[str] = ()) -> list[ListEntry]:
    """Parse "rgb depth [focal]" lines into existing files.

    A path is taken as written when it is absolute and exists; otherwise it is looked up under each of
    ``folders`` of ``root`` (:data:`LIST_FOLDERS`: VPD's and BTS's lists are relative to ``sync/`` or
    ``official_splits/test/``), then under ``root``. BTS and VPD training lines start with "/"
    ("/kitchen_0028b/rgb_00045.jpg"); that slash is read as relative too. The focal length column is ignored,
    blank lines are skipped, and every named file must exist: the problems of all lines are raised together
    (:class:`~iedp.data.folders.DataProblems`).
    """
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise InputError(f"{list_file}: list file not found")
    entries, problems = [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        columns = line.split()
        if not columns:
            continue
        if len(columns) not in (2, 3):
            problems.append(
                f"{list_file}, line {number}: expected 'rgb depth [focal]' (2 or 3 columns), "
                f"got {len(columns)}: {line.strip()!r}"
            )
            continue
        paths = []
        for column in columns[:2]:
            path, tried = _resolve(column, root, folders)
            if path is None:
                elsewhere = f" (nor {', '.join(map(str, tried[:-1]))})" if len(tried) > 1 else ""
                problems.append(f"{list_file}, line {number}: file not found: {tried[-1]}{elsewhere}")
            paths.append(path)
        if None not in paths:
            entries.append(ListEntry(rgb=paths[0], depth=paths[1], line=number))
    raise_if_problems(f"NYUv2 list {list_file}", problems)
    if not entries:
        raise InputError(f"{list_file}: no entries")
    return entries


def sample_name(rgb: Path) -> str:
    """A frame's name, unique across scenes (NYUv2 numbers frames per scene): "bathroom_rgb_00045". Saved
    predictions (``iedp evaluate --save-predictions``) are named so, and ``iedp score depth --list`` finds them."""
    return f"{rgb.parent.name}_{rgb.stem}"


class NYUDepthV2(Dataset):
    """NYUv2 frames named by a list file, as sample dicts. List paths are resolved by :func:`read_list_file`
    against ``folders`` of ``root`` (``LIST_FOLDERS["test"]`` for the official test list).

    Each sample is a dict:

    - ``image``: float32 3×H×W in [-1, 1];
    - ``depth``: float32 1×H×W metres, 0 = no measurement;
    - ``scene``: NYU scene type from the RGB file's folder (:func:`match_scene`), "" if unknown;
    - ``scene_id``: index of ``scene`` in :attr:`scene_names`, -1 if unknown;
    - ``prompt``: "a photo of a {scene}" (:func:`scene_prompt`), "a photo" if unknown;
    - ``name``: "<folder>_<rgb stem>" ("kitchen_rgb_00045"): unique across scenes and usable as a
      flat file name for predictions.

    With ``augment`` the sample goes through :class:`~iedp.data.transforms.DepthTrainTransform`
    (480×480 crop padded to 512 by default); without it the full frame is returned unpadded
    (480×640 for the official test split). Augmentation draws from
    ``numpy.random.default_rng((seed, epoch, index))``; call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path,
        augment: bool = False,
        transform: DepthTrainTransform | None = None,
        scene_names: Sequence[str] | None = None,
        seed: int = 0,
        folders: Sequence[str] = LIST_FOLDERS["train"],
    ) -> None:
        self.entries = read_list_file(list_file, root, folders)
        self.augment = augment
        self.transform = transform or DepthTrainTransform()
        self.scene_names = list(scene_names) if scene_names is not None else read_names("nyu_scenes.txt")
        self.scenes = [match_scene(entry.rgb.parent.name, self.scene_names) or "" for entry in self.entries]
        unknown = [
            entry.rgb.parent.name for entry, scene in zip(self.entries, self.scenes, strict=True) if not scene
        ]
        if unknown:
            logger.warning(
                "%s: %d of %d frames are in folders with no known scene type (first: %r); "
                "they get scene_id -1 and the prompt 'a photo'",
                list_file,
                len(unknown),
                len(self.entries),
                unknown[0],
            )
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        entry = self.entries[index]
        image = read_rgb(entry.rgb)
        depth = read_depth_png(entry.depth)
        check_same_size(image, entry.rgb, depth, entry.depth)
        return depth_sample(self, index, image, depth, sample_name(entry.rgb))
