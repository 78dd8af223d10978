"""Synthetic scenes rendered once into memory, and their captions.

Captions come from the renderer's scene type, the classes visible in the label map, how many objects of each
class were placed, and the mean colour of each class's pixels. Their forms:

- "a photo of a kitchen with white walls, a brown floor, a red refrigerator, two cabinets and a sink" (the
  rich caption: scene type, then every visible class largest first, with its colour when it is one object or a
  room surface, with its count otherwise; training also draws shuffled subsets of these phrases),
- "a photo of a kitchen" (IEDP's depth prompt),
- "a photo of a wall, floor, refrigerator and cabinet" (IEDP's segmentation prompt: every class, largest first).

The text tower sees all three, and the text-to-image UNet learns from them what Stable Diffusion learns from
its captions: the scene, the objects, their number and their colours.
"""

from __future__ import annotations

import colorsys
import logging
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from iedp.data.prompts import _join_names, scene_prompt
from iedp.data.synthetic import SYNTHETIC_CLASSES, SyntheticScenes
from iedp.workers import one_thread_per_worker, start_worker

ROOM_SURFACES = ("wall", "floor", "ceiling")
"""Classes of the room itself: in every scene."""

MIN_VISIBLE_SHARE = 0.005
"""A class counts as visible when it covers at least this share of the pixels."""

COLOUR_WORDS = (
    "black",
    "white",
    "grey",
    "beige",
    "brown",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
)
"""The colour names of :func:`colour_name`."""

COUNT_WORDS = ("one", "two", "three", "four", "five", "six")

_PLURALS = {"bookshelf": "bookshelves", "wall": "walls"}

# Probabilities of the training caption forms: a shuffled subset of the rich caption's phrases, the whole rich
# caption, the scene only, the segmentation prompt.
_FORM_PROBS = (0.4, 0.3, 0.15, 0.15)


def plural(name: str) -> str:
    """English plural of a class name: "chairs", "bookshelves"."""
    return _PLURALS.get(name, name + "s")


def colour_name(rgb: Sequence[float]) -> str:
    """The nearest of :data:`COLOUR_WORDS` to a colour given as RGB in [0, 1]."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    hue *= 360
    if value < 0.18:
        return "black"
    if saturation < 0.18:
        return "white" if value > 0.75 else "grey"
    if 15 <= hue < 50 and saturation < 0.4 and value > 0.55:
        return "beige"
    if hue < 15 or hue >= 340:
        return "red" if value > 0.35 else "brown"
    if hue < 45:
        return "orange" if value > 0.6 else "brown"
    if hue < 70:
        return "yellow"
    if hue < 170:
        return "green"
    if hue < 260:
        return "blue"
    if hue < 300:
        return "purple"
    return "pink"


@dataclass(frozen=True)
class SceneSet:
    """Rendered scenes. ``images`` uint8 (N, 3, H, W); ``scenes[i]`` the scene type; ``classes[i]`` the visible
    classes (room surfaces included), largest area first; ``counts[i]`` the number of placed objects of each
    visible furniture class; ``colours[i]`` the colour name of each visible class's mean pixel colour."""

    images: torch.Tensor
    scenes: list[str]
    classes: list[list[str]]
    counts: list[dict[str, int]]
    colours: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.scenes)

    def objects(self, index: int) -> list[str]:
        """The visible classes of scene ``index`` that are furniture, largest first."""
        return [name for name in self.classes[index] if name not in ROOM_SURFACES]

    def phrases(self, index: int) -> list[str]:
        """The noun phrases of scene ``index``'s visible classes, largest first: "white walls", "a brown floor",
        "a red sofa", "two chairs"."""
        phrases = []
        for name in self.classes[index]:
            colour = self.colours[index][name]
            if name == "wall":
                phrases.append(f"{colour} walls")
                continue
            count = self.counts[index].get(name, 1)
            if count > 1:
                phrases.append(f"{COUNT_WORDS[min(count, len(COUNT_WORDS)) - 1]} {plural(name)}")
            else:
                phrases.append(f"a {colour} {name}")
        return phrases

    def to(self, device: torch.device | str) -> SceneSet:
        """The same scenes with their images on ``device``."""
        return replace(self, images=self.images.to(device))

    def float_images(self, index: torch.Tensor | slice, size: int | None = None) -> torch.Tensor:
        """Images ``index`` as float (B, 3, S, S) in [-1, 1], area-resized to ``size`` when given."""
        images = self.images[index].float() / 127.5 - 1
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="area")
        return images


def render_scenes(split: str, size: int, resolution: int, seed: int, workers: int = 1) -> SceneSet:
    """Render ``size`` scenes of ``SyntheticScenes(split=split, seed=seed)`` at ``resolution`` (square).

    With ``workers`` > 1 the scenes are rendered in that many spawned processes of one thread each, in contiguous
    chunks; every scene is drawn from its own seed, so the result does not depend on ``workers``.
    """
    if workers <= 1 or size < 2 * workers:
        return _render_range(split, size, resolution, seed, 0, size)
    bounds = np.linspace(0, size, workers + 1).round().astype(int).tolist()
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with (
        one_thread_per_worker(),
        ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(level,)) as pool,
    ):
        parts = list(pool.map(partial(_render_range, split, size, resolution, seed), bounds[:-1], bounds[1:]))
    return SceneSet(
        images=torch.cat([part.images for part in parts]),
        scenes=[scene for part in parts for scene in part.scenes],
        classes=[classes for part in parts for classes in part.classes],
        counts=[counts for part in parts for counts in part.counts],
        colours=[colours for part in parts for colours in part.colours],
    )


def _render_range(split: str, size: int, resolution: int, seed: int, start: int, stop: int) -> SceneSet:
    """Scenes ``start`` to ``stop`` of ``SyntheticScenes(split=split, size=size, seed=seed)``."""
    dataset = SyntheticScenes(task="depth", split=split, size=size, resolution=resolution, seed=seed)
    images, scenes, classes, counts, colours = [], [], [], [], []
    for index in range(start, stop):
        sample = dataset.render(index)
        images.append(torch.from_numpy(sample.rgb).permute(2, 0, 1))  # (3, H, W)
        scenes.append(sample.scene)
        visible = visible_classes(sample.label)
        classes.append(visible)
        placed = Counter(sample.objects)
        counts.append({name: placed[name] for name in visible if placed[name] > 0})
        colours.append(class_colours(sample.rgb, sample.label, visible))
    return SceneSet(
        images=torch.stack(images), scenes=scenes, classes=classes, counts=counts, colours=colours
    )


def class_colours(rgb: np.ndarray, label: np.ndarray, names: Sequence[str]) -> dict[str, str]:
    """Colour name of the mean pixel colour of each class in ``names``, from uint8 ``rgb`` (H, W, 3) and
    ``label`` (H, W)."""
    pixels = rgb.reshape(-1, 3).astype(np.float64) / 255
    flat = label.reshape(-1)
    return {name: colour_name(pixels[flat == SYNTHETIC_CLASSES.index(name)].mean(axis=0)) for name in names}


def visible_classes(label: np.ndarray) -> list[str]:
    """Class names covering at least :data:`MIN_VISIBLE_SHARE` of ``label`` (H, W), largest area first."""
    counts = np.bincount(label.reshape(-1), minlength=len(SYNTHETIC_CLASSES))
    order = np.argsort(-counts, kind="stable")
    return [SYNTHETIC_CLASSES[c] for c in order if counts[c] >= MIN_VISIBLE_SHARE * label.size]


def caption(scene: str, phrases: Sequence[str]) -> str:
    """ "a photo of a kitchen with white walls, a red table and two chairs"; "a photo of a kitchen" without
    phrases."""
    if not phrases:
        return scene_prompt(scene)
    return f"{scene_prompt(scene)} with {_join_names(list(phrases))}"


def class_prompt(classes: Sequence[str]) -> str:
    """IEDP's segmentation prompt: "a photo of a wall, floor, bed and lamp"."""
    return f"a photo of a {_join_names(classes)}" if classes else "a photo"


def canonical_caption(scenes: SceneSet, index: int) -> str:
    """The evaluation caption of scene ``index``: its type and every visible class, largest first."""
    return caption(scenes.scenes[index], scenes.phrases(index))


def sample_caption(scenes: SceneSet, index: int, rng: np.random.Generator) -> str:
    """A random training caption of scene ``index``, in one of the forms of the module docstring."""
    form = rng.choice(len(_FORM_PROBS), p=_FORM_PROBS)
    phrases = scenes.phrases(index)
    if form == 0:
        count = int(rng.integers(1, len(phrases) + 1))
        return caption(scenes.scenes[index], [phrases[i] for i in rng.permutation(len(phrases))[:count]])
    if form == 1:
        return caption(scenes.scenes[index], phrases)
    if form == 2:
        return scene_prompt(scenes.scenes[index])
    return class_prompt(scenes.classes[index])
