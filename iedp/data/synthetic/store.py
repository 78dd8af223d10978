"""A split's rendered scenes saved once and read back memory-mapped, so several runs on the same scenes (the demo's
four, an ablation's dozens) do not each render them again: rendering is a fifth of a demo segmentation step on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iedp.data.synthetic.scenes import SceneSample

_ARRAYS = ("rgb", "label", "depth")


class RenderedScenes:
    """Scenes ``0..N-1`` of a split as saved by :meth:`save`: ``store[i]`` is the :class:`SceneSample` of index ``i``.

    The pixel arrays are memory-mapped, so processes reading the same folder share one copy in memory.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        self.contents = json.loads((folder / "contents.json").read_text(encoding="utf-8"))
        lengths = {len(array) for array in self.arrays.values()} | {len(self.contents)}
        if len(lengths) != 1:
            raise ValueError(f"{folder}: the saved arrays and contents.json disagree on the number of scenes")

    @staticmethod
    def save(folder: str | Path, count: int, render: Callable[[int], SceneSample]) -> None:
        """Write scenes ``render(0) .. render(count - 1)`` to ``folder``: one ``.npy`` per pixel array, filled
        one scene at a time (the split is never all in memory), and ``contents.json``."""
        folder = Path(folder)
        arrays: dict[str, np.ndarray] = {}
        contents = []
        for index in range(count):
            scene = render(index)
            for name in _ARRAYS:
                value = getattr(scene, name)
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        folder / f"{name}.npy", mode="w+", dtype=value.dtype, shape=(count, *value.shape)
                    )
                arrays[name][index] = value
            contents.append({"scene": scene.scene, "objects": scene.objects})
        for array in arrays.values():
            array.flush()
        (folder / "contents.json").write_text(json.dumps(contents), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.contents)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self)

    def __getitem__(self, index: int) -> SceneSample:
        if index not in self:
            raise IndexError(f"scene {index} out of range for {len(self)} saved scenes")
        content = self.contents[index]
        return SceneSample(
            rgb=np.array(self.arrays["rgb"][index]),
            label=np.array(self.arrays["label"][index]),
            depth=np.array(self.arrays["depth"][index]),
            scene=content["scene"],
            objects=list(content["objects"]),
        )
