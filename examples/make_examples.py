"""Writes the tiny example trees of examples/ (run from the repository root: python examples/make_examples.py).

custom_seg/: three classes (sky, road, car), odd-sized images, index label maps with 255 for unlabelled pixels.
custom_depth/: two scenes as folders (corridor, room), uint16 PNG depth in millimetres with holes (0 = none).
"""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
COLOURS = np.array([[90, 150, 230], [80, 80, 80], [200, 30, 40]])


def seg_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.6))
    label[horizon:] = 1
    top, left = int(rng.integers(horizon - 8, height - 12)), int(rng.integers(0, width - 24))
    label[top : top + 10, left : left + 22] = 2
    label[:, :2] = 255  # an unlabelled border
    image = COLOURS[np.minimum(label, 2)] + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def depth_sample(
    rng: np.random.Generator, height: int, width: int, scene: str
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.linspace(0, 1, height)[:, None]
    far = 8.0 if scene == "corridor" else 4.0
    metres = np.broadcast_to(far - (far - 1.0) * rows, (height, width)).copy()
    metres += rng.uniform(-0.2, 0.2)
    millimetres = np.round(metres * 1000).astype(np.uint16)
    millimetres[rng.random((height, width)) < 0.1] = 0  # holes: no measurement
    shade = (255 * (1 - metres / 10))[..., None] * np.array([1.0, 0.9, 0.8])
    image = np.clip(shade + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    return image, millimetres


def main() -> None:
    rng = np.random.default_rng(0)
    seg = HERE / "custom_seg"
    seg.mkdir(exist_ok=True)
    (seg / "classes.txt").write_text("sky\nroad\ncar\n")
    (seg / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in COLOURS) + "ignore 0 0 0\n")
    for split, count in (("train", 4), ("val", 2)):
        for folder in ("images", "labels"):
            (seg / folder / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = seg_sample(rng, 70 + 2 * index, 90 + 3 * index)
            Image.fromarray(image).save(seg / "images" / split / f"{split}_{index:03d}.jpg", quality=90)
            Image.fromarray(label).save(seg / "labels" / split / f"{split}_{index:03d}.png")
    depth = HERE / "custom_depth"
    depth.mkdir(exist_ok=True)
    (depth / "scenes.txt").write_text("corridor\nroom\n")
    for split, count in (("train", 4), ("val", 2)):
        for index in range(count):
            scene = ("corridor", "room")[index % 2]
            for folder in ("images", "depth"):
                (depth / folder / split / scene).mkdir(parents=True, exist_ok=True)
            image, millimetres = depth_sample(rng, 60 + index, 84 + 2 * index, scene)
            Image.fromarray(image).save(depth / "images" / split / scene / f"{index:03d}.png")
            Image.fromarray(millimetres).save(depth / "depth" / split / scene / f"{index:03d}.png")


if __name__ == "__main__":
    main()
