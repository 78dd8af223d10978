"""Class (segmentation) and scene (depth) name lists, by name or from a text file."""

from __future__ import annotations

from pathlib import Path

from iedp.errors import InputError
from iedp.resources import read_names

BUILTIN = ("ade20k", "nyu_scenes", "synthetic", "synthetic_scenes")
BUILTIN += ("cityscapes", "kitti_categories", "generic_scene")


def load_class_names(spec: str) -> list[str]:
    """``spec`` is a built-in list name or a text file with one name per line."""
    if spec == "ade20k":
        return read_names("ade20k_classes.txt")
    if spec == "nyu_scenes":
        return read_names("nyu_scenes.txt")
    if spec == "cityscapes":  # the 19 evaluated classes, in trainId order
        return read_names("cityscapes_classes.txt")
    if spec == "kitti_categories":  # KITTI raw's drive categories
        return read_names("kitti_categories.txt")
    if spec == "generic_scene":  # depth data without scene names: one scene token
        return ["scene"]
    if spec in ("synthetic", "synthetic_scenes"):
        from iedp.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SCENES

        return list(SYNTHETIC_CLASSES if spec == "synthetic" else SYNTHETIC_SCENES)
    path = Path(spec)
    if path.suffix == ".txt" and not path.is_file():  # a file was meant: say which is missing
        raise InputError(f"model.classes: {path} not found (a text file of names, one per line)")
    if not path.is_file():
        raise InputError(f"model.classes: {spec!r} is neither one of {', '.join(BUILTIN)} nor a text file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise InputError(f"model.classes: {path} holds no names (expected one class name per line)")
    return names
