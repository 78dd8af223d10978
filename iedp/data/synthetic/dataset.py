"""The synthetic scenes as a dataset with the real datasets' sample keys (segmentation or depth)."""

import numpy as np
import torch
from torch.utils.data import Dataset

from iedp.data.prompts import scene_prompt, seg_prompt
from iedp.data.synthetic.scenes import SYNTHETIC_CLASSES, SYNTHETIC_SCENES, SceneSample, render_scene
from iedp.data.synthetic.store import RenderedScenes
from iedp.data.transforms import (
    CUTDEPTH_PROB,
    DepthTrainTransform,
    SegTrainTransform,
    depth_test_transform,
    normalize,
)
from iedp.errors import InputError

_SPLITS = ("train", "val")
_TASKS = ("seg", "depth")
_SEEDS_PER_SPLIT = 1 << 32


class SyntheticScenes(Dataset):
    """Rendered scenes as sample dicts with the keys of the real datasets, so model and engine code is shared.

    - ``task="seg"``: ``image`` (float32 3×H×W in [-1, 1]), ``label`` (int64 H×W, indices into
      :data:`SYNTHETIC_CLASSES`), ``prompt`` (classes present, largest first), ``name``;
      like :class:`~iedp.data.ade20k.ADE20K`.
    - ``task="depth"``: ``image``, ``depth`` (float32 1×H×W metres), ``scene``, ``scene_id``
      (index into :data:`SYNTHETIC_SCENES`), ``prompt`` ("a photo of a kitchen"), ``name``;
      like :class:`~iedp.data.nyu.NYUDepthV2`.

    Sample ``i`` of a split renders scene seed ``(2 × seed + split) × 2**32 + i``, so the train
    and val splits never share a scene. Rendering happens lazily in ``__getitem__``; with
    ``cache`` each rendered scene is kept in memory (per DataLoader worker). With ``augment``,
    segmentation samples get :class:`~iedp.data.transforms.SegTrainTransform` (random rescale
    0.5–2× of the native size, crop back to it, flip, photometric distortion) and depth samples
    :class:`~iedp.data.transforms.DepthTrainTransform` (flip and colour jitter at full size, and CutDepth
    with ``cutdepth``),
    drawing from ``numpy.random.default_rng((seed, split, epoch, index))``.
    """

    def __init__(
        self,
        task: str = "seg",
        split: str = "train",
        size: int = 1000,
        resolution: int | tuple[int, int] = 128,
        seed: int = 0,
        augment: bool = False,
        cache: bool = False,
        cutdepth: bool = False,
    ) -> None:
        if task not in _TASKS:
            raise InputError(f"task must be one of {', '.join(_TASKS)}, got {task!r}")
        if split not in _SPLITS:
            raise InputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        if not 0 < size <= _SEEDS_PER_SPLIT:
            raise InputError(f"size must be in 1..{_SEEDS_PER_SPLIT}, got {size}")
        if seed < 0:
            raise InputError(f"seed must be non-negative, got {seed}")
        self.task, self.split, self.size, self.seed, self.augment = task, split, size, seed, augment
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.class_names = list(SYNTHETIC_CLASSES)
        self.scene_names = list(SYNTHETIC_SCENES)
        self.epoch = 0
        self._cache: dict[int, SceneSample] | RenderedScenes | None = {} if cache else None
        height, width = self.resolution
        self.seg_transform = SegTrainTransform(
            crop_size=(height, width), base_scale=(4 * max(height, width), min(height, width))
        )
        self.depth_transform = DepthTrainTransform(
            crop_size=(height, width), pad_multiple=1, cutdepth_prob=CUTDEPTH_PROB if cutdepth else 0.0
        )

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation stream; call before each epoch."""
        self.epoch = epoch

    def scene_seed(self, index: int) -> int:
        """The :func:`render_scene` seed of sample ``index``."""
        return (2 * self.seed + _SPLITS.index(self.split)) * _SEEDS_PER_SPLIT + index

    def use_rendered(self, scenes: RenderedScenes) -> None:
        """Read scene ``i`` from ``scenes[i]`` (this split's scenes as saved) instead of rendering it."""
        if len(scenes) != self.size:
            raise ValueError(f"{len(scenes)} rendered scenes for a split of {self.size}")
        self._cache = scenes

    def render(self, index: int) -> SceneSample:
        """The scene of sample ``index`` before augmentation (cached when enabled)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = render_scene(self.scene_seed(index), *self.resolution)
        if isinstance(self._cache, dict):
            self._cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        scene = self.render(index)
        rng = np.random.default_rng((self.seed, _SPLITS.index(self.split), self.epoch, index))
        name = f"synthetic_{self.split}_{index:06d}"
        if self.task == "seg":
            if self.augment:
                image, label = self.seg_transform(scene.rgb, scene.label, rng)
            else:
                image, label = normalize(scene.rgb), torch.from_numpy(scene.label).long()
            return {
                "image": image,
                "label": label,
                "prompt": seg_prompt(label, self.class_names),
                "name": name,
            }
        if self.augment:
            image, depth = self.depth_transform(scene.rgb, scene.depth, rng)
        else:
            image, depth = depth_test_transform(scene.rgb, scene.depth)
        return {
            "image": image,
            "depth": depth,
            "scene": scene.scene,
            "scene_id": self.scene_names.index(scene.scene),
            "prompt": scene_prompt(scene.scene),
            "name": name,
        }
