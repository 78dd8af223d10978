"""Synthetic scenes rendered once into memory, and their captions.

Captions come from the renderer's scene type and the objects visible in the label map, in the forms IEDP's
explicit branch and class tokens use, so the pre-trained text tower has seen each of them:

- "a photo of a kitchen with a table, a chair and a lamp" (a shuffled subset of the objects),
- "a photo of a kitchen" (the depth prompt),
- "a photo of a wall, floor, refrigerator and cabinet" (the segmentation prompt: every class, largest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iedp.data.prompts import _join_names, scene_prompt
from iedp.data.synthetic import SYNTHETIC_CLASSES, SyntheticScenes

ROOM_SURFACES = ("wall", "floor", "ceiling")
"""Classes of the room itself: in every scene, so named only by the segmentation-prompt form."""

MIN_VISIBLE_SHARE = 0.005
"""A class counts as visible when it covers at least this share of the pixels."""

# Probabilities of the caption forms: scene with objects, scene only, segmentation prompt.
_FORM_PROBS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class SceneSet:
    """Rendered scenes. ``images`` uint8 (N, 3, H, W); ``scenes[i]`` the scene type; ``classes[i]`` the visible
    classes (room surfaces included), largest area first."""

    images: torch.Tensor
    scenes: list[str]
    classes: list[list[str]]

    def __len__(self) -> int:
        return len(self.scenes)

    def objects(self, index: int) -> list[str]:
        """The visible classes of scene ``index`` that are furniture, largest first."""
        return [name for name in self.classes[index] if name not in ROOM_SURFACES]

    def float_images(self, index: torch.Tensor | slice, size: int | None = None) -> torch.Tensor:
        """Images ``index`` as float (B, 3, S, S) in [-1, 1], area-resized to ``size`` when given."""
        images = self.images[index].float() / 127.5 - 1
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="area")
        return images


def render_scenes(split: str, size: int, resolution: int, seed: int) -> SceneSet:
    """Render ``size`` scenes of ``SyntheticScenes(split=split, seed=seed)`` at ``resolution`` (square)."""
    dataset = SyntheticScenes(task="depth", split=split, size=size, resolution=resolution, seed=seed)
    images, scenes, classes = [], [], []
    for index in range(size):
        sample = dataset.render(index)
        images.append(torch.from_numpy(sample.rgb).permute(2, 0, 1))  # (3, H, W)
        scenes.append(sample.scene)
        classes.append(visible_classes(sample.label))
    return SceneSet(images=torch.stack(images), scenes=scenes, classes=classes)


def visible_classes(label: np.ndarray) -> list[str]:
    """Class names covering at least :data:`MIN_VISIBLE_SHARE` of ``label`` (H, W), largest area first."""
    counts = np.bincount(label.reshape(-1), minlength=len(SYNTHETIC_CLASSES))
    order = np.argsort(-counts, kind="stable")
    return [SYNTHETIC_CLASSES[c] for c in order if counts[c] >= MIN_VISIBLE_SHARE * label.size]


def caption(scene: str, objects: Sequence[str]) -> str:
    """ "a photo of a kitchen with a table, a chair and a lamp"; "a photo of a kitchen" without objects."""
    if not objects:
        return scene_prompt(scene)
    return f"{scene_prompt(scene)} with {_join_names([f'a {name}' for name in objects])}"


def class_prompt(classes: Sequence[str]) -> str:
    """IEDP's segmentation prompt: "a photo of a wall, floor, bed and lamp"."""
    return f"a photo of a {_join_names(classes)}" if classes else "a photo"


def canonical_caption(scenes: SceneSet, index: int) -> str:
    """The evaluation caption of scene ``index``: its type and every visible object, largest first."""
    return caption(scenes.scenes[index], scenes.objects(index))


def sample_caption(scenes: SceneSet, index: int, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A random training caption of scene ``index`` and the classes it names (for the UNet's class tokens).

    Scene with objects: a random non-empty subset of the visible objects, shuffled. Scene only: no class.
    Segmentation prompt: every visible class, largest first.
    """
    form = rng.choice(len(_FORM_PROBS), p=_FORM_PROBS)
    objects = scenes.objects(index)
    if form == 0 and objects:
        count = int(rng.integers(1, len(objects) + 1))
        named = [objects[i] for i in rng.permutation(len(objects))[:count]]
        return caption(scenes.scenes[index], named), named
    if form == 2:
        return class_prompt(scenes.classes[index]), list(scenes.classes[index])
    return scene_prompt(scenes.scenes[index]), []
