"""Explicit-branch prompts built from labels (DESIGN §2) and NYUv2 scene names from folder names.

Pure functions of their inputs so that the exact wording can be tested; the CLIP tokenizer later
truncates a prompt to its 77 tokens.
"""

from collections.abc import Sequence

import numpy as np
import torch

_EMPTY_PROMPT = "a photo"


def _join_names(names: Sequence[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _photo_of(names: Sequence[str]) -> str:
    return f"a photo of a {_join_names(names)}" if names else _EMPTY_PROMPT


def classes_by_area(label: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255) -> list[int]:
    """Class indices present in ``label``, largest pixel count first (ties: lower index first)."""
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    values = values.reshape(-1).astype(np.int64)
    values = values[values != ignore_index]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = values[(values < 0) | (values >= num_classes)][0]
        raise ValueError(f"label value {bad} outside 0..{num_classes - 1} (ignore index {ignore_index})")
    counts = np.bincount(values, minlength=num_classes)
    order = np.argsort(-counts, kind="stable")
    return [int(c) for c in order if counts[c] > 0]


def seg_prompt(
    label: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    ignore_index: int = 255,
    tokenizer_max_words: int | None = None,
) -> str:
    """Prompt naming the classes present in ``label``, largest area first.

    For example "a photo of a wall, floor, bed and lamp"; "a photo" when nothing is labelled.

    ``tokenizer_max_words`` optionally caps the prompt's whitespace-separated word count by
    dropping the smallest classes, so that a long list still ends in a clean "... and x" instead
    of being cut mid-name by the tokenizer. ``None`` keeps every class.
    """
    names = [class_names[c] for c in classes_by_area(label, len(class_names), ignore_index)]
    if tokenizer_max_words is not None:
        while names and len(_photo_of(names).split()) > tokenizer_max_words:
            names.pop()
    return _photo_of(names)


def scene_prompt(scene: str | None) -> str:
    """Prompt for a scene type: "living_room" gives "a photo of a living room", unknown gives "a photo"."""
    if not scene:
        return _EMPTY_PROMPT
    return _photo_of([scene.replace("_", " ")])


def match_scene(folder_name: str, scenes: Sequence[str]) -> str | None:
    """NYUv2 scene type of a folder name, or None when no known scene matches.

    BTS training folders are "<scene>_<id>" ("office_kitchen_0001a"), test folders are the scene
    itself ("kitchen"), and some copies prefix "nyu_". The longest scene ``s`` with
    ``folder == s`` or ``folder.startswith(s + "_")`` wins, so "office_kitchen_0001a" is
    office_kitchen, not office.
    """
    folder = folder_name.strip().lower()
    folder = folder.removeprefix("nyu_")
    matches = [s for s in scenes if folder == s or folder.startswith(s + "_")]
    return max(matches, key=len) if matches else None
