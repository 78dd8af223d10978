"""Helpers shared by the folder-based datasets (your own data, KITTI, Cityscapes): file listings paired by name,
cheap header checks, depth files with a declared scale, scene tables, and the error that lists every problem.

A dataset collects problems while it indexes its files and raises one :class:`DataProblems` naming all of them, so
a user fixes a broken tree in one pass instead of one error per run. ``iedp data check`` prints the same list.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from iedp.data.images import _DECODE_ERRORS, _open_decoded
from iedp.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = (".png", ".npy", ".tif", ".tiff")
SHOWN_PROBLEMS = 30  # problems spelt out in an error message; the rest are counted


class DataProblems(InputError):
    """Everything wrong with a dataset folder, found in one pass; :attr:`problems` holds one line per problem."""

    def __init__(self, what: str, problems: Sequence[str]) -> None:
        self.what = what
        self.problems = list(problems)
        shown = [f"  - {p}" for p in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            shown.append(
                f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more (`iedp data check` lists them all)"
            )
        count = len(self.problems)
        super().__init__(f"{what}: {count} problem{'s' if count != 1 else ''}\n" + "\n".join(shown))


def raise_if_problems(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise DataProblems(what, problems)


def index_files(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """Files under ``folder`` (any depth) with one of ``suffixes`` (case-insensitive), keyed by their path relative
    to ``folder`` without the suffix ("kitchen/0001"). Hidden files are skipped."""
    suffixes = tuple(s.lower() for s in suffixes)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        files.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return files


def pair_by_name(
    images: dict[str, Path], targets: dict[str, Path], image_dir: Path, target_dir: Path, target_kind: str
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(key, image, target) for names present on both sides, and one problem per file that has no partner."""
    problems = [
        f"{images[k]}: no {target_kind} {target_dir / k}.* for this image" for k in images if k not in targets
    ]
    problems += [
        f"{targets[k]}: no image {image_dir / k}.* for this {target_kind}" for k in targets if k not in images
    ]
    return [(k, images[k], targets[k]) for k in images if k in targets], problems


def header(path: Path) -> tuple[tuple[int, int], str] | str:
    """((height, width), PIL mode) read from the file header only, or a problem line when it cannot be opened."""
    try:
        with Image.open(path) as img:
            return (img.height, img.width), img.mode
    except _DECODE_ERRORS as err:
        return f"{path}: cannot read the image header ({err})"


def size_problem(
    image: Path, image_size: tuple[int, int], target: Path, target_size: tuple[int, int]
) -> str | None:
    if image_size == target_size:
        return None
    return (
        f"{target}: size {target_size[0]}x{target_size[1]} (HxW) does not match image {image} "
        f"of size {image_size[0]}x{image_size[1]}"
    )


def depth_header(path: Path) -> tuple[tuple[int, int], str] | str:
    """((height, width), kind) of a depth file without decoding it, or a problem line. Kinds: "uint16" (PNG, scaled
    by ``data.depth_scale``) and "float" (``.npy`` / ``.tif`` metres)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            return f"{path}: cannot read the .npy file ({err})"
        if array.ndim != 2 or array.dtype.kind != "f":
            return (
                f"{path}: expected a 2-D float array of metres, got shape {array.shape} dtype {array.dtype}"
            )
        return (int(array.shape[0]), int(array.shape[1])), "float"
    info = header(path)
    if isinstance(info, str):
        return info
    size, mode = info
    if suffix == ".png":
        if mode not in ("I;16", "I"):
            return f"{path}: not a 16-bit depth PNG (mode {mode}); expected uint16 depth × data.depth_scale"
        return size, "uint16"
    if mode != "F":
        return f"{path}: not a float32 depth TIFF (mode {mode}); expected metres as 32-bit float"
    return size, "float"


def read_depth(path: Path, scale: float) -> np.ndarray:
    """Depth in metres as float32 H×W, 0 = no measurement: a uint16 PNG divided by ``scale`` (1000 for millimetres,
    256 for KITTI), or float32 metres from ``.npy`` / ``.tif``. Non-finite and negative values become 0."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            metres = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot read the .npy file ({err})") from err
        if metres.ndim != 2 or metres.dtype.kind != "f":
            raise InputError(f"{path}: expected a 2-D float array of metres, got shape {metres.shape}")
    else:
        img, _ = _open_decoded(path)
        if suffix == ".png":
            if img.mode not in ("I;16", "I"):
                raise InputError(f"{path}: not a 16-bit depth PNG (mode {img.mode})")
            metres = np.asarray(img).astype(np.float64) / scale
        else:
            if img.mode != "F":
                raise InputError(f"{path}: not a float32 depth TIFF (mode {img.mode})")
            metres = np.asarray(img, dtype=np.float64)
    metres = np.where(np.isfinite(metres) & (metres > 0), metres, 0.0)
    return metres.astype(np.float32)


def read_scene_table(path: Path) -> tuple[dict[str, str], list[str]]:
    """A two-column CSV ``key,scene`` (a header line such as ``image,scene`` or ``drive,category`` is allowed): the
    table and its problems."""
    if not path.is_file():
        return {}, [f"{path}: scene table not found (data.scenes)"]
    table, problems = {}, []
    with path.open(newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 2 or not all(row):
                problems.append(f"{path}, line {number}: expected 'image,scene', got {','.join(row)!r}")
            elif number == 1 and row[1].lower() in ("scene", "category"):
                continue
            else:
                table[row[0]] = row[1]
    return table, problems


def scene_problems(scenes: dict[str, str], known: Sequence[str], where: str) -> list[str]:
    """One problem per scene name that is not in the model's scene list (``model.classes``)."""
    unknown = sorted({s for s in scenes.values() if s not in known})
    if not unknown:
        return []
    return [
        f"{where}: scene names {', '.join(unknown)} are not in the scene list model.classes "
        f"({', '.join(known[:10])}{', ...' if len(known) > 10 else ''}); fix the names or add them to that list"
    ]
