"""Vectorised numpy ray casting for the synthetic scenes: primitives, a pinhole camera, textures.

World frame: metres, +y up, the room is the box [0, W] × [0, H] × [0, D]. Primitives are boxes
(turned about +y by ``yaw``), spheres and vertical cylinders. Ray directions are scaled so their
component along the optical axis is 1, which makes the hit distance ``t`` the z-depth itself.
"""

import itertools
from dataclasses import dataclass

import numpy as np

TEXTURES = ("plain", "stripes", "checker", "noise")
ROOM_FACE_NORMALS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64
)
"""Inward normals of the room faces x = 0, x = W, floor, ceiling, z = 0, z = D (see :func:`room_exit`)."""

_EPS = 1e-6


@dataclass(frozen=True)
class Material:
    """Two colours mixed by a procedural pattern evaluated at world points."""

    colour: np.ndarray  # (3,) RGB in [0, 1]
    colour2: np.ndarray  # (3,) second colour of the pattern
    texture: str  # one of TEXTURES
    axis: np.ndarray  # (3,) unit vector across stripes
    frequency: float  # cycles per metre (stripes), cells per metre (checker, noise)
    lattice: np.ndarray  # (n, n, n) random values for value noise


@dataclass(frozen=True)
class Primitive:
    """A solid in world coordinates with the class and material its pixels get."""

    kind: str  # "box" (size = half extents), "sphere" (size = (r,)), "cylinder" (size = (r, half height))
    center: np.ndarray  # (3,); for a cylinder the middle of its vertical axis
    size: np.ndarray
    yaw: float  # rotation about +y (boxes only)
    class_id: int
    material: Material


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: position, orthonormal basis and focal length in pixels."""

    origin: np.ndarray
    forward: np.ndarray
    right: np.ndarray
    up: np.ndarray
    focal: float

    @classmethod
    def looking(cls, origin: np.ndarray, yaw: float, pitch: float, focal: float) -> "Camera":
        """Camera at ``origin`` turned by ``yaw`` about +y from +z and tilted by ``pitch`` (up > 0)."""
        forward = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
        right = np.array([np.cos(yaw), 0.0, -np.sin(yaw)])
        return cls(origin, forward, right, np.cross(forward, right), focal)


def value_noise(points: np.ndarray, lattice: np.ndarray, frequency: float) -> np.ndarray:
    """Smooth 3-D value noise in [0, 1] at (N, 3) points, tiled from a small random lattice."""
    scaled = points * frequency
    cell = np.floor(scaled)
    weight = scaled - cell
    weight = weight * weight * (3.0 - 2.0 * weight)  # smoothstep
    cell = cell.astype(np.int64)
    size = lattice.shape[0]
    noise = np.zeros(len(points))
    for corner in itertools.product((0, 1), repeat=3):
        corner_weight = np.prod(
            [weight[:, a] if c else 1.0 - weight[:, a] for a, c in enumerate(corner)], axis=0
        )
        noise += corner_weight * lattice[tuple((cell[:, a] + c) % size for a, c in enumerate(corner))]
    return noise


def texture_fade(cycles_per_pixel: np.ndarray) -> np.ndarray:
    """How much of a pattern's contrast survives at a pixel: 1 up to a quarter cycle per pixel, 0 from half.

    A pattern finer than half a cycle per pixel (the Nyquist limit) would alias into moiré; fading it to
    its mean colour is what a filtered camera sees, and it keeps the images smooth enough for a VAE.
    """
    return np.clip((0.5 - cycles_per_pixel) / 0.25, 0.0, 1.0)


def albedo(material: Material, points: np.ndarray, footprint: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) surface colour of ``material`` at (N, 3) world points.

    ``footprint`` (N,) is the length in metres that a pixel covers on the surface there; with it, patterns
    finer than the pixels fade to their mean colour (:func:`texture_fade`).
    """
    if material.texture == "plain":
        mix = np.zeros(len(points))
        cycles_per_metre = 0.0
    elif material.texture == "stripes":
        mix = (np.sin(2 * np.pi * material.frequency * (points @ material.axis)) > 0).astype(np.float64)
        cycles_per_metre = material.frequency
    elif material.texture == "checker":
        mix = np.floor(points * material.frequency).sum(axis=1) % 2
        cycles_per_metre = material.frequency / 2  # two cells per cycle
    else:
        mix = value_noise(points, material.lattice, material.frequency)
        cycles_per_metre = material.frequency / 2
    if footprint is not None and cycles_per_metre > 0:
        mix = 0.5 + (mix - 0.5) * texture_fade(cycles_per_metre * footprint)
    return material.colour * (1.0 - mix[:, None]) + material.colour2 * mix[:, None]


def ray_directions(camera: Camera, height: int, width: int) -> np.ndarray:
    """(H, W, 3) directions through pixel centres with unit component along ``camera.forward``."""
    cols = (np.arange(width) + 0.5 - width / 2) / camera.focal
    rows = -(np.arange(height) + 0.5 - height / 2) / camera.focal
    return camera.forward + cols[None, :, None] * camera.right + rows[:, None, None] * camera.up


def _nonzero(values: np.ndarray) -> np.ndarray:
    """Replace exact zeros so slab divisions give ±huge instead of NaN."""
    return np.where(np.abs(values) < 1e-12, 1e-12, values)


def _unyaw(yaw: float, vectors: np.ndarray) -> np.ndarray:
    """World → object frame for (..., 3) vectors: the inverse rotation about +y."""
    c, s = np.cos(yaw), np.sin(yaw)
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    return np.stack([c * x - s * z, y, s * x + c * z], axis=-1)


def _hit_box(primitive: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    local_origin = _unyaw(primitive.yaw, origin - primitive.center)
    inv = 1.0 / _nonzero(_unyaw(primitive.yaw, dirs))
    near = (-primitive.size - local_origin) * inv
    far = (primitive.size - local_origin) * inv
    t_enter = np.minimum(near, far).max(axis=-1)
    t_exit = np.maximum(near, far).min(axis=-1)
    return np.where((t_exit >= t_enter) & (t_enter > _EPS), t_enter, np.inf)


def _hit_sphere(primitive: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    offset = origin - primitive.center
    a = (dirs * dirs).sum(axis=-1)
    b = 2.0 * (dirs @ offset)
    disc = b * b - 4 * a * (offset @ offset - primitive.size[0] ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cylinder(primitive: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """The nearer of the side and the end cap facing the camera."""
    radius, half_height = primitive.size
    ox, oy, oz = origin - primitive.center
    dx, dy, dz = dirs[..., 0], _nonzero(dirs[..., 1]), dirs[..., 2]
    a = _nonzero(dx * dx + dz * dz)
    b = 2.0 * (dx * ox + dz * oz)
    disc = b * b - 4 * a * (ox * ox + oz * oz - radius * radius)
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    side_ok = (disc >= 0) & (t_side > _EPS) & (np.abs(oy + t_side * dy) <= half_height)
    t_cap = ((half_height if oy > 0 else -half_height) - oy) / dy
    cap_ok = (t_cap > _EPS) & ((ox + t_cap * dx) ** 2 + (oz + t_cap * dz) ** 2 <= radius * radius)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))


_HITS = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def intersect(primitive: Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Distance along each ray (…, 3) to the primitive's surface; inf where the ray misses."""
    return _HITS[primitive.kind](primitive, origin, dirs)


def surface_normals(primitive: Primitive, points: np.ndarray) -> np.ndarray:
    """(N, 3) outward unit normals at (N, 3) points on the primitive's surface."""
    offset = points - primitive.center
    if primitive.kind == "sphere":
        return offset / primitive.size[0]
    if primitive.kind == "cylinder":
        radius, half_height = primitive.size
        radial = np.hypot(offset[:, 0], offset[:, 2]) / radius
        on_cap = np.abs(offset[:, 1]) / half_height >= radial
        side = offset * np.array([1.0, 0.0, 1.0]) / np.maximum(radial * radius, 1e-9)[:, None]
        cap = np.zeros_like(offset)
        cap[:, 1] = np.sign(offset[:, 1])
        return np.where(on_cap[:, None], cap, side)
    local = _unyaw(primitive.yaw, offset) / primitive.size
    rows, axis = np.arange(len(local)), np.abs(local).argmax(axis=1)
    normal = np.zeros_like(local)
    normal[rows, axis] = np.sign(local[rows, axis])
    return _unyaw(-primitive.yaw, normal)


def screen_window(
    primitive: Primitive, camera: Camera, height: int, width: int
) -> tuple[slice, slice] | None:
    """Pixel rows and columns that can see the primitive, from its projected bounding box; None if none.

    Testing each primitive only inside its window is what makes rendering fast: most parts (legs,
    handles, books) cover a few hundred pixels.
    """
    radius = primitive.size[0]
    if primitive.kind == "box":
        reach = np.hypot(primitive.size[0], primitive.size[2])
        half = np.array([reach, primitive.size[1], reach])
    elif primitive.kind == "cylinder":
        half = np.array([radius, primitive.size[1], radius])
    else:
        half = np.full(3, radius)
    relative = primitive.center + half * np.array(list(itertools.product((-1, 1), repeat=3))) - camera.origin
    depth = relative @ camera.forward
    if depth.max() <= _EPS:
        return None
    if depth.min() <= 0.05:  # straddles the camera plane: the projection is unreliable, test everything
        return slice(0, height), slice(0, width)
    cols = (relative @ camera.right) / depth * camera.focal + width / 2 - 0.5
    rows = -(relative @ camera.up) / depth * camera.focal + height / 2 - 0.5
    r0, r1 = max(int(np.floor(rows.min())) - 1, 0), min(int(np.ceil(rows.max())) + 2, height)
    c0, c1 = max(int(np.floor(cols.min())) - 1, 0), min(int(np.ceil(cols.max())) + 2, width)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def room_exit(room_size: np.ndarray, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where rays from inside the room box leave it: distance and face (0/1 x = 0/W, 2/3 floor/ceiling, 4/5 z = 0/D)."""
    safe = _nonzero(dirs)
    t_axis = (np.where(safe > 0, room_size, 0.0) - origin) / safe
    axis = t_axis.argmin(axis=-1)[..., None]
    t = np.take_along_axis(t_axis, axis, axis=-1)[..., 0]
    positive = np.take_along_axis(safe, axis, axis=-1)[..., 0] > 0
    return t, 2 * axis[..., 0] + positive


def cast(
    camera: Camera, room_size: np.ndarray, primitives: list[Primitive], height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of every pixel's ray: (z-depth H×W, surface H×W, directions H×W×3).

    ``surface`` holds the primitive index, or ``face - 6`` (−6..−1) where the ray reaches a room face.
    """
    dirs = ray_directions(camera, height, width)
    depth, face = room_exit(room_size, camera.origin, dirs)
    surface = face - 6
    for index, primitive in enumerate(primitives):
        window = screen_window(primitive, camera, height, width)
        if window is None:
            continue
        t = intersect(primitive, camera.origin, dirs[window])
        closer = t < depth[window]
        depth[window] = np.where(closer, t, depth[window])
        surface[window] = np.where(closer, index, surface[window])
    return depth, surface, dirs
