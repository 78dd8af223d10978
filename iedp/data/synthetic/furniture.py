"""Furniture of the synthetic scenes as parametric groups of primitives, one builder per class.

Each builder draws the sizes of one object from realistic ranges and returns its parts in the
object's own frame: origin on the floor at the centre of its footprint, +y up, +z the side that
faces into the room (away from the wall for wall-mounted objects). Sizes, proportions and
mounting differ per class, which is what lets a model tell classes apart when colours do not.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """A primitive in its object's frame: origin on the floor at the footprint centre, +z facing out."""

    kind: str  # "box" (size = half extents), "sphere" (size = (r,)), "cylinder" (size = (r, half height))
    center: tuple[float, float, float]
    size: tuple[float, ...]
    role: str = "main"  # "main", "accent" or "books": which of the object's materials the part gets


@dataclass(frozen=True)
class Shape:
    parts: list[Part]
    width: float  # footprint along the object's x
    depth: float  # footprint along the object's z
    mount: str  # "free" (anywhere, any yaw), "wall" (back against a wall), "flat" (hung on a wall)


def _box(cx: float, cy: float, cz: float, hx: float, hy: float, hz: float, role: str = "main") -> Part:
    return Part("box", (cx, cy, cz), (hx, hy, hz), role)


def _cylinder(cx: float, y0: float, cz: float, radius: float, height: float, role: str = "main") -> Part:
    return Part("cylinder", (cx, y0 + height / 2, cz), (radius, height / 2), role)


def _legs(half_x: float, half_z: float, height: float, thickness: float) -> list[Part]:
    t = thickness / 2
    return [
        _box(sx * (half_x - t), height / 2, sz * (half_z - t), t, height / 2, t, "accent")
        for sx in (-1, 1)
        for sz in (-1, 1)
    ]


def _bed(rng: np.random.Generator) -> Shape:
    width, length = rng.uniform(1.0, 1.9), rng.uniform(1.9, 2.15)
    base, head = rng.uniform(0.35, 0.55), rng.uniform(0.8, 1.2)
    parts = [
        _box(0, base / 2, 0, width / 2, base / 2, length / 2),
        _box(0, head / 2, -length / 2 + 0.04, width / 2, head / 2, 0.04, "accent"),
        _box(0, base + 0.06, -length / 2 + 0.35, width * 0.4, 0.06, 0.18, "accent"),
    ]
    return Shape(parts, width, length, "wall")


def _table(rng: np.random.Generator) -> Shape:
    height = rng.uniform(0.7, 0.78)
    if rng.random() < 0.5:
        radius = rng.uniform(0.4, 0.6)
        parts = [
            _cylinder(0, height - 0.04, 0, radius, 0.04),
            _cylinder(0, 0.03, 0, 0.05, height - 0.07, "accent"),
            _cylinder(0, 0, 0, 0.25, 0.03, "accent"),
        ]
        return Shape(parts, 2 * radius, 2 * radius, "free")
    width, depth = rng.uniform(0.8, 1.6), rng.uniform(0.7, 1.0)
    parts = [
        _box(0, height - 0.02, 0, width / 2, 0.02, depth / 2),
        *_legs(width / 2, depth / 2, height - 0.04, 0.06),
    ]
    return Shape(parts, width, depth, "free")


def _chair(rng: np.random.Generator) -> Shape:
    side, seat, back = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48), rng.uniform(0.35, 0.5)
    parts = [
        _box(0, seat - 0.025, 0, side / 2, 0.025, side / 2),
        _box(0, seat + back / 2, -side / 2 + 0.025, side / 2, back / 2, 0.025),
        *_legs(side / 2, side / 2, seat - 0.05, 0.04),
    ]
    return Shape(parts, side, side, "free")


def _sofa(rng: np.random.Generator) -> Shape:
    width, depth = rng.uniform(1.5, 2.4), rng.uniform(0.8, 0.95)
    seat, back, arm, arm_width = (
        rng.uniform(0.38, 0.45),
        rng.uniform(0.75, 0.9),
        rng.uniform(0.55, 0.65),
        0.18,
    )
    parts = [
        _box(0, seat / 2, 0.1, width / 2 - arm_width, seat / 2, depth / 2 - 0.1),
        _box(0, back / 2, -depth / 2 + 0.1, width / 2, back / 2, 0.1, "accent"),
        *(
            _box(s * (width / 2 - arm_width / 2), arm / 2, 0, arm_width / 2, arm / 2, depth / 2)
            for s in (-1, 1)
        ),
    ]
    return Shape(parts, width, depth, "wall")


def _lamp(rng: np.random.Generator) -> Shape:
    height, base = rng.uniform(1.3, 1.7), rng.uniform(0.12, 0.18)
    parts = [_cylinder(0, 0, 0, base, 0.03, "accent"), _cylinder(0, 0.03, 0, 0.015, height, "accent")]
    if rng.random() < 0.5:
        shade, shade_height = rng.uniform(0.15, 0.25), rng.uniform(0.25, 0.35)
        parts.append(_cylinder(0, height - shade_height / 2, 0, shade, shade_height))
    else:
        shade = rng.uniform(0.15, 0.22)
        parts.append(Part("sphere", (0, height + shade * 0.6, 0), (shade,)))
    return Shape(parts, 2 * max(base, shade), 2 * max(base, shade), "free")


def _cabinet(rng: np.random.Generator) -> Shape:
    width, depth, height = rng.uniform(0.5, 1.4), rng.uniform(0.4, 0.6), rng.uniform(0.7, 2.0)
    parts = [
        _box(0, height / 2, 0, width / 2, height / 2, depth / 2),
        _box(width / 4, height * 0.6, depth / 2 + 0.01, 0.012, 0.06, 0.012, "accent"),
    ]
    return Shape(parts, width, depth, "wall")


def _tv(rng: np.random.Generator) -> Shape:
    width = rng.uniform(0.8, 1.4)
    height, centre = width * 9 / 16, rng.uniform(1.0, 1.4)
    parts = [
        _box(0, centre, -0.015, width / 2 + 0.03, height / 2 + 0.03, 0.02, "accent"),
        _box(0, centre, 0.0, width / 2, height / 2, 0.03),
    ]
    return Shape(parts, width + 0.06, 0.06, "flat")


def _plant(rng: np.random.Generator) -> Shape:
    pot, pot_height = rng.uniform(0.1, 0.22), rng.uniform(0.2, 0.45)
    parts = [_cylinder(0, 0, 0, pot, pot_height, "accent")]
    reach = pot
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.2, 0.4)
        dx, dz = rng.uniform(-0.12, 0.12, size=2)
        parts.append(Part("sphere", (dx, pot_height + radius * rng.uniform(0.6, 1.1), dz), (radius,)))
        reach = max(reach, radius + np.hypot(dx, dz))
    return Shape(parts, 2 * reach, 2 * reach, "free")


def _bathtub(rng: np.random.Generator) -> Shape:
    width, depth, height, rim = rng.uniform(1.4, 1.75), rng.uniform(0.7, 0.8), rng.uniform(0.45, 0.6), 0.08
    hw, hd = width / 2, depth / 2
    parts = [
        _box(0, 0.05, 0, hw, 0.05, hd, "accent"),
        _box(0, height / 2, -hd + rim / 2, hw, height / 2, rim / 2),
        _box(0, height / 2, hd - rim / 2, hw, height / 2, rim / 2),
        _box(-hw + rim / 2, height / 2, 0, rim / 2, height / 2, hd),
        _box(hw - rim / 2, height / 2, 0, rim / 2, height / 2, hd),
    ]
    return Shape(parts, width, depth, "wall")


def _toilet(rng: np.random.Generator) -> Shape:
    bowl, bowl_height = rng.uniform(0.18, 0.22), rng.uniform(0.38, 0.42)
    parts = [
        _cylinder(0, 0, 0.1, bowl, bowl_height),
        _box(0, bowl_height + 0.2, -0.35 + 0.09, 0.2, 0.2, 0.09, "accent"),
    ]
    return Shape(parts, 0.45, 0.7, "wall")


def _sink(rng: np.random.Generator) -> Shape:
    if rng.random() < 0.5:  # pedestal sink
        half_width = rng.uniform(0.25, 0.32)
        parts = [_cylinder(0, 0, 0, 0.09, 0.74, "accent"), _box(0, 0.82, 0, half_width, 0.08, 0.22)]
        return Shape(parts, 2 * half_width, 0.46, "wall")
    width, depth, height = rng.uniform(0.8, 1.2), 0.6, rng.uniform(0.85, 0.92)
    parts = [
        _box(0, height / 2, 0, width / 2, height / 2, depth / 2),
        _cylinder(0, height, -depth / 2 + 0.08, 0.02, 0.25, "accent"),
    ]
    return Shape(parts, width, depth, "wall")


def _bookshelf(rng: np.random.Generator) -> Shape:
    width, depth, height, board = rng.uniform(0.7, 1.4), rng.uniform(0.28, 0.4), rng.uniform(1.4, 2.2), 0.03
    hw, hd = width / 2, depth / 2
    parts = [
        _box(-hw + board / 2, height / 2, 0, board / 2, height / 2, hd),
        _box(hw - board / 2, height / 2, 0, board / 2, height / 2, hd),
        _box(0, height / 2, -hd + board / 2, hw, height / 2, board / 2),
    ]
    shelves = int(rng.integers(3, 6))
    gap = height / shelves
    for level in range(shelves + 1):
        board_y = float(np.clip(level * gap, board / 2, height - board / 2))
        parts.append(_box(0, board_y, 0, hw, board / 2, hd))
        if level < shelves:
            books = gap * rng.uniform(0.6, 0.9)
            parts.append(
                _box(0, level * gap + board + books / 2, 0, hw - board, books / 2, hd * 0.8, "books")
            )
    return Shape(parts, width, depth, "wall")


def _desk(rng: np.random.Generator) -> Shape:
    width, depth, height = rng.uniform(1.0, 1.6), rng.uniform(0.6, 0.8), rng.uniform(0.72, 0.76)
    parts = [
        _box(0, height - 0.02, 0, width / 2, 0.02, depth / 2),
        *(
            _box(s * (width / 2 - 0.02), (height - 0.04) / 2, 0, 0.02, (height - 0.04) / 2, depth / 2)
            for s in (-1, 1)
        ),
        _box(width / 4, height - 0.12, 0.02, width / 4 - 0.03, 0.08, depth / 2 - 0.04, "accent"),
    ]
    return Shape(parts, width, depth, "wall")


def _refrigerator(rng: np.random.Generator) -> Shape:
    width, depth, height = rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.75), rng.uniform(1.6, 1.95)
    parts = [
        _box(0, height / 2, 0, width / 2, height / 2, depth / 2),
        _box(width / 2 - 0.08, height * 0.55, depth / 2 + 0.02, 0.015, height * 0.2, 0.02, "accent"),
    ]
    return Shape(parts, width, depth, "wall")


def _door(rng: np.random.Generator) -> Shape:
    width, height = rng.uniform(0.75, 0.95), rng.uniform(1.95, 2.1)
    parts = [
        _box(0, height / 2 + 0.012, -0.01, width / 2 + 0.05, height / 2 + 0.012, 0.015, "accent"),
        _box(0, height / 2, 0.0, width / 2, height / 2, 0.02),
        Part("sphere", (width / 2 - 0.08, 1.0, 0.05), (0.03,), "accent"),
    ]
    return Shape(parts, width + 0.1, 0.06, "flat")


def _picture(rng: np.random.Generator) -> Shape:
    width, height, centre = rng.uniform(0.3, 1.0), rng.uniform(0.25, 0.8), rng.uniform(1.3, 1.7)
    parts = [
        _box(0, centre, -0.01, width / 2, height / 2, 0.015, "accent"),
        _box(0, centre, 0.0, width / 2 - 0.03, height / 2 - 0.03, 0.02),
    ]
    return Shape(parts, width, 0.04, "flat")


FURNITURE: dict[str, Callable[[np.random.Generator], Shape]] = {
    # class name -> builder
    "bed": _bed,
    "table": _table,
    "chair": _chair,
    "sofa": _sofa,
    "lamp": _lamp,
    "cabinet": _cabinet,
    "tv": _tv,
    "plant": _plant,
    "bathtub": _bathtub,
    "toilet": _toilet,
    "sink": _sink,
    "bookshelf": _bookshelf,
    "desk": _desk,
    "refrigerator": _refrigerator,
    "door": _door,
    "picture": _picture,
}
