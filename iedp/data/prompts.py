"""Explicit-branch prompts built from labels (DESIGN §2) and NYUv2 scene names from folder names.

Pure functions of their inputs so that the exact wording can be tested; the CLIP tokenizer later
truncates a prompt to its 77 tokens.
"""

from collections.abc import Sequence

import numpy as np
import torch

from iedp.visualize import classes_by_area

_EMPTY_PROMPT = "a photo"


def _join_names(names: Sequence[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _photo_of(names: Sequence[str]) -> str:
    return f"a photo of a {_join_names(names)}" if names else _EMPTY_PROMPT


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
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    present = [c for c, _ in classes_by_area(values, ignore_index)]
    bad = [c for c in present if not 0 <= c < len(class_names)]
    if bad:
        last = len(class_names) - 1
        raise ValueError(f"label value {bad[0]} outside 0..{last} (ignore index {ignore_index})")
    names = [class_names[c] for c in present]
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
