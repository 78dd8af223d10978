"""Procedurally rendered indoor scenes with exact labels and metric depth (DESIGN §6).

A pinhole camera stands near the back wall of a box room (floor, ceiling, walls) furnished
according to a scene type. Every object is built from boxes, spheres and vertical cylinders and
rendered by :mod:`iedp.data.synthetic.raycast`, so each pixel gets an exact class and z-depth.

What makes the task learnable rather than a colour lookup:

- each scene type has its own furniture mix (with overlap), so scene prompts and class prompts
  carry information about the image, and its signature objects are placed in view;
- an object's colour is drawn around a class hue but widely (a third of the draws ignore the
  class) and gets a random procedural texture (stripes, checker, value noise), so the class has
  to be read from shape, size and position (beds against walls, lamps tall and thin, pictures
  hung on walls...);
- a room's walls and floor usually have its scene type's finish (tiled bathrooms, wooden living-room
  floors, carpeted bedrooms...), otherwise any, so the room says something about the scene without
  giving it away;
- Lambertian shading from a random point light plus ambient light.

Patterns finer than the pixels fade to their mean colour, as through a camera's filter, so images carry
no moiré. Not modelled: shadows, reflections, anti-aliased edges (labels and depth stay exact per pixel).
Depths stay within 0.5..10 m: rooms are at most 6 × 7 × 3.1 m, objects keep 0.9 m ahead of the
camera and the field of view is at most 70°.
"""

import colorsys
from dataclasses import dataclass, field

import numpy as np

from iedp.data.synthetic.furniture import FURNITURE, Shape
from iedp.data.synthetic.raycast import (
    ROOM_FACE_NORMALS,
    TEXTURES,
    Camera,
    Material,
    Primitive,
    albedo,
    cast,
    surface_normals,
)

RENDERER_VERSION = "2"
"""Bumped whenever the same seed renders a different scene."""

# fmt: off
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "wall", "floor", "ceiling", "bed", "table", "chair", "sofa", "lamp", "cabinet", "tv", "plant",
    "bathtub", "toilet", "sink", "bookshelf", "desk", "refrigerator", "door", "picture",
)
SYNTHETIC_SCENES: tuple[str, ...] = ("bedroom", "kitchen", "living_room", "bathroom", "office", "dining_room")
"""Scene types, spelled as NYUv2 scene names so prompts read the same as on real data."""

# scene -> (required [(class, min count, max count)], optional [(class, probability, max count)])
_RECIPES: dict[str, tuple[list[tuple[str, int, int]], list[tuple[str, float, int]]]] = {
    "bedroom": ([("bed", 1, 1)], [
        ("lamp", 0.6, 1), ("cabinet", 0.5, 2), ("plant", 0.3, 1), ("tv", 0.3, 1), ("chair", 0.3, 1),
        ("desk", 0.25, 1), ("picture", 0.6, 2), ("door", 0.5, 1), ("bookshelf", 0.2, 1)]),
    "kitchen": ([("refrigerator", 1, 1), ("cabinet", 1, 3)], [
        ("sink", 0.8, 1), ("table", 0.5, 1), ("chair", 0.5, 3), ("plant", 0.3, 1), ("lamp", 0.2, 1),
        ("door", 0.4, 1), ("picture", 0.3, 1)]),
    "living_room": ([("sofa", 1, 1)], [
        ("table", 0.7, 1), ("tv", 0.6, 1), ("lamp", 0.5, 2), ("plant", 0.6, 2), ("bookshelf", 0.4, 1),
        ("chair", 0.4, 2), ("cabinet", 0.3, 1), ("picture", 0.6, 2), ("door", 0.4, 1)]),
    "bathroom": ([("toilet", 1, 1), ("sink", 1, 1)], [
        ("bathtub", 0.6, 1), ("cabinet", 0.4, 1), ("plant", 0.2, 1), ("door", 0.5, 1), ("picture", 0.2, 1)]),
    "office": ([("desk", 1, 2), ("chair", 1, 2)], [
        ("bookshelf", 0.6, 2), ("cabinet", 0.5, 1), ("lamp", 0.3, 1), ("plant", 0.5, 1), ("tv", 0.3, 1),
        ("picture", 0.4, 1), ("door", 0.5, 1), ("table", 0.2, 1)]),
    "dining_room": ([("table", 1, 1), ("chair", 2, 4)], [
        ("cabinet", 0.5, 1), ("lamp", 0.4, 1), ("plant", 0.4, 1), ("picture", 0.6, 2), ("door", 0.4, 1),
        ("bookshelf", 0.2, 1), ("sofa", 0.1, 1)]),
}

# class -> (hue in degrees, saturation range, value range): the centre of a deliberately wide draw
_PALETTE: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {
    "wall": (40, (0.0, 0.3), (0.6, 0.95)),     "floor": (30, (0.2, 0.6), (0.3, 0.8)),
    "ceiling": (50, (0.0, 0.12), (0.75, 1.0)), "bed": (220, (0.2, 0.7), (0.4, 0.9)),
    "table": (30, (0.3, 0.7), (0.25, 0.7)),    "chair": (25, (0.2, 0.8), (0.2, 0.8)),
    "sofa": (0, (0.3, 0.8), (0.3, 0.8)),       "lamp": (50, (0.1, 0.6), (0.7, 1.0)),
    "cabinet": (35, (0.2, 0.6), (0.3, 0.85)),  "tv": (220, (0.0, 0.3), (0.03, 0.25)),
    "plant": (110, (0.4, 0.9), (0.25, 0.7)),   "bathtub": (200, (0.0, 0.15), (0.8, 1.0)),
    "toilet": (200, (0.0, 0.1), (0.8, 1.0)),   "sink": (200, (0.0, 0.15), (0.7, 1.0)),
    "bookshelf": (30, (0.3, 0.7), (0.25, 0.7)), "desk": (30, (0.2, 0.6), (0.3, 0.8)),
    "refrigerator": (200, (0.0, 0.15), (0.6, 0.95)), "door": (30, (0.2, 0.6), (0.35, 0.85)),
    "picture": (0, (0.3, 0.9), (0.3, 0.9)),
}
# fmt: on
_TEXTURE_PROBS = (0.35, 0.25, 0.15, 0.25)  # plain, stripes, checker, noise
_CLASS_ID = {name: index for index, name in enumerate(SYNTHETIC_CLASSES)}
_FACE_CLASS = np.array([_CLASS_ID[name] for name in ("wall", "wall", "floor", "ceiling", "wall", "wall")])
_MIN_FORWARD = 0.9  # metres between the camera and the nearest footprint, along the room's z


@dataclass(frozen=True)
class SceneSample:
    """One rendered scene.

    ``rgb`` uint8 H×W×3; ``label`` uint8 H×W indices into :data:`SYNTHETIC_CLASSES` (every pixel
    labelled); ``depth`` float32 H×W z-depth in metres; ``scene`` one of :data:`SYNTHETIC_SCENES`;
    ``objects`` the class names of the placed objects (some may be hidden behind others or out of
    view; the label map is the truth about what is visible).
    """

    rgb: np.ndarray
    label: np.ndarray
    depth: np.ndarray
    scene: str
    objects: list[str]


# ----------------------------------------------------------------------------- materials


def _random_colour(rng: np.random.Generator, class_name: str) -> np.ndarray:
    hue, saturation, value = _PALETTE[class_name]
    hue = rng.uniform(0, 360) if rng.random() < 0.3 else hue + rng.normal(0, 35)
    if rng.random() < 0.3:
        saturation, value = (0.0, 0.9), (0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, rng.uniform(*saturation), rng.uniform(*value)))


def _material(
    rng: np.random.Generator,
    class_name: str,
    texture: str | None = None,
    axis: np.ndarray | None = None,
    frequency: tuple[float, float] = (2.0, 12.0),
) -> Material:
    """A colour around the class palette with a random (or the given) texture."""
    colour = _random_colour(rng, class_name)
    colour2 = colour * rng.uniform(0.45, 0.9) if rng.random() < 0.6 else _random_colour(rng, class_name)
    if axis is None:
        axis = np.eye(3)[rng.integers(3)] if rng.random() < 0.6 else rng.normal(size=3)
    return Material(
        colour=colour,
        colour2=colour2,
        texture=texture or str(rng.choice(TEXTURES, p=_TEXTURE_PROBS)),
        axis=axis / np.linalg.norm(axis),
        frequency=float(rng.uniform(*frequency)),
        lattice=rng.random((8, 8, 8)),
    )


@dataclass(frozen=True)
class _Finish:
    """A scene type's typical wall or floor: hue range (degrees), saturation, value, texture and its frequency."""

    hue: tuple[float, float]
    saturation: tuple[float, float]
    value: tuple[float, float]
    texture: str
    frequency: tuple[float, float] = (2.0, 12.0)
    contrast: tuple[float, float] = (0.55, 0.85)  # the pattern's second colour is the first times this


# fmt: off
# scene -> surface -> finish: tiled bathrooms, wooden living-room floors, carpeted bedrooms... as real rooms are
_FINISHES: dict[str, dict[str, _Finish]] = {
    "bedroom": {"wall": _Finish((260, 340), (0.12, 0.35), (0.7, 0.92), "plain"),
                "floor": _Finish((10, 40), (0.2, 0.45), (0.45, 0.75), "noise", (6.0, 12.0), (0.8, 0.92))},
    "kitchen": {"wall": _Finish((60, 110), (0.12, 0.35), (0.75, 0.95), "plain"),
                "floor": _Finish((0, 360), (0.0, 0.08), (0.75, 0.95), "checker", (2.5, 4.0), (0.15, 0.35))},
    "living_room": {"wall": _Finish((35, 55), (0.12, 0.3), (0.75, 0.95), "plain"),
                    "floor": _Finish((22, 36), (0.5, 0.75), (0.35, 0.6), "stripes", (4.0, 7.0), (0.6, 0.8))},
    "bathroom": {"wall": _Finish((180, 205), (0.05, 0.35), (0.8, 1.0), "checker", (5.0, 7.0), (0.8, 0.9)),
                 "floor": _Finish((190, 220), (0.05, 0.3), (0.5, 0.8), "checker", (7.0, 10.0), (0.7, 0.85))},
    "office": {"wall": _Finish((0, 360), (0.0, 0.06), (0.72, 0.92), "plain"),
               "floor": _Finish((200, 230), (0.08, 0.3), (0.28, 0.5), "checker", (1.8, 2.5), (0.8, 0.9))},
    "dining_room": {"wall": _Finish((340, 380), (0.35, 0.6), (0.45, 0.7), "stripes", (3.0, 6.0), (0.7, 0.85)),
                    "floor": _Finish((12, 24), (0.55, 0.75), (0.3, 0.5), "stripes", (4.0, 7.0), (0.6, 0.8))},
}
# fmt: on
_TYPICAL_FINISH = 0.8  # share of rooms whose walls (and, drawn apart, floor) have their scene's finish


def _room_material(rng: np.random.Generator, scene: str, surface: str) -> Material:
    """A wall, floor or ceiling: usually the scene type's typical finish, otherwise any (:func:`_material`)."""
    finish = _FINISHES[scene].get(surface)
    if finish is None or rng.random() >= _TYPICAL_FINISH:
        return _material(rng, surface)
    hue = rng.uniform(*finish.hue) % 360
    colour = np.array(
        colorsys.hsv_to_rgb(hue / 360, rng.uniform(*finish.saturation), rng.uniform(*finish.value))
    )
    # stripes run along the floor boards and up the wallpaper: across x on the far wall, across z on the others
    axis = np.array([1.0, 0.0, 1.0]) / np.sqrt(2.0) if surface == "wall" else np.eye(3)[2 * rng.integers(2)]
    return Material(
        colour=colour,
        colour2=colour * rng.uniform(*finish.contrast),
        texture=finish.texture,
        axis=axis,
        frequency=float(rng.uniform(*finish.frequency)),
        lattice=rng.random((8, 8, 8)),
    )


# ----------------------------------------------------------------------------- layout


@dataclass
class _Layout:
    """The room, the camera and the footprints (x0, x1, z0, z1) taken so far."""

    width: float
    depth: float
    height: float
    camera_z: float
    furniture: list[tuple[float, float, float, float]] = field(default_factory=list)
    hung: list[tuple[float, float, float, float]] = field(default_factory=list)

    def fits(
        self, rect: tuple[float, float, float, float], taken: list[tuple[float, float, float, float]]
    ) -> bool:
        x0, x1, z0, z1 = rect
        if x0 < 0 or x1 > self.width or z1 > self.depth or z0 < self.camera_z + _MIN_FORWARD:
            return False
        margin = 0.05
        return not any(
            x0 < bx1 + margin and bx0 < x1 + margin and z0 < bz1 + margin and bz0 < z1 + margin
            for bx0, bx1, bz0, bz1 in taken
        )


def _rotate(yaw: float, x: float, z: float) -> tuple[float, float]:
    """Object frame → world: rotation about +y by ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    return c * x + s * z, -s * x + c * z


def _footprint(shape: Shape, x: float, z: float, yaw: float) -> tuple[float, float, float, float]:
    corners = [_rotate(yaw, sx * shape.width / 2, sz * shape.depth / 2) for sx in (-1, 1) for sz in (-1, 1)]
    xs, zs = [x + cx for cx, _ in corners], [z + cz for _, cz in corners]
    return min(xs), max(xs), min(zs), max(zs)


def _propose(rng: np.random.Generator, shape: Shape, layout: _Layout) -> tuple[float, float, float]:
    """A random (x, z, yaw): free objects anywhere, the others backed onto the far, left or right wall."""
    if shape.mount == "free":
        return (
            rng.uniform(0, layout.width),
            rng.uniform(layout.camera_z, layout.depth),
            rng.uniform(0, 2 * np.pi),
        )
    offset = shape.depth / 2 + 0.001
    wall = rng.choice(3, p=(0.5, 0.25, 0.25))
    if wall == 0:  # far wall z = depth, facing -z
        return rng.uniform(0, layout.width), layout.depth - offset, np.pi
    along = rng.uniform(layout.camera_z, layout.depth)
    if wall == 1:  # left wall x = 0, facing +x
        return offset, along, np.pi / 2
    return layout.width - offset, along, -np.pi / 2  # right wall x = width, facing -x


def _in_view(camera: Camera, half_width: float, x: float, z: float) -> bool:
    """Whether floor point (x, z), raised 0.5 m, projects into the middle 80% of the image width."""
    relative = np.array([x, 0.5, z]) - camera.origin
    forward = relative @ camera.forward
    return forward > 0 and abs(relative @ camera.right) < 0.8 * half_width * forward


def _place(
    rng: np.random.Generator,
    shape: Shape,
    layout: _Layout,
    camera: Camera,
    half_width: float,
    required: bool,
) -> tuple[float, float, float] | None:
    """Rejection-sample a free spot; None if none is found.

    A required object first gets 60 tries at spots in view, then 60 anywhere; an optional one
    gets 15 anywhere. Things hung on walls only avoid each other, furniture only furniture.
    """
    taken = layout.hung if shape.mount == "flat" else layout.furniture
    attempts = [True] * 60 + [False] * 60 if required else [False] * 15
    for must_be_in_view in attempts:
        x, z, yaw = _propose(rng, shape, layout)
        rect = _footprint(shape, x, z, yaw)
        if layout.fits(rect, taken) and (not must_be_in_view or _in_view(camera, half_width, x, z)):
            taken.append(rect)
            return x, z, yaw
    return None


def _object_list(rng: np.random.Generator, scene: str) -> list[tuple[str, bool]]:
    """(class, required) in placement order: the scene's own objects, then shuffled optional ones.

    Only the minimum count of a scene's own class is required; further copies are optional.
    """
    required, optional = _RECIPES[scene]
    names = [
        (name, copy < low) for name, low, high in required for copy in range(int(rng.integers(low, high + 1)))
    ]
    extras = [
        name
        for name, probability, count in optional
        for _ in range(int(rng.integers(1, count + 1)) if rng.random() < probability else 0)
    ]
    rng.shuffle(extras)
    return names + [(name, False) for name in extras]


def _role_material(rng: np.random.Generator, role: str, class_name: str, yaw: float) -> Material:
    """Material of an object's "main", "accent" or "books" parts; books are many-coloured spines."""
    if role == "books":
        along_wall = np.array([np.cos(yaw), 0.0, -np.sin(yaw)])
        return _material(rng, "picture", texture="stripes", axis=along_wall, frequency=(12.0, 30.0))
    return _material(rng, class_name)


def _to_world(
    shape: Shape, class_name: str, spot: tuple[float, float, float], rng: np.random.Generator
) -> list[Primitive]:
    """World primitives of a placed object; each role (main, accent, books) has its own material."""
    x, z, yaw = spot
    materials = {
        role: _role_material(rng, role, class_name, yaw)
        for role in dict.fromkeys(p.role for p in shape.parts)
    }
    primitives = []
    for part in shape.parts:
        px, py, pz = part.center
        wx, wz = _rotate(yaw, px, pz)
        primitives.append(
            Primitive(
                kind=part.kind,
                center=np.array([x + wx, py, z + wz]),
                size=np.array(part.size, dtype=np.float64),
                yaw=yaw,
                class_id=_CLASS_ID[class_name],
                material=materials[part.role],
            )
        )
    return primitives


def _room(rng: np.random.Generator, scene: str) -> _Layout:
    if scene == "bathroom":
        width, depth = rng.uniform(2.2, 3.4), rng.uniform(2.8, 4.0)
    elif scene == "kitchen":
        width, depth = rng.uniform(3.0, 5.0), rng.uniform(3.5, 6.0)
    else:
        width, depth = rng.uniform(3.5, 6.0), rng.uniform(4.0, 7.0)
    return _Layout(width=width, depth=depth, height=rng.uniform(2.4, 3.1), camera_z=rng.uniform(0.15, 0.4))


def _camera(rng: np.random.Generator, layout: _Layout, height: int, width: int) -> Camera:
    """Camera near the back wall, looking into the room slightly downwards; 55–70° across the longer side."""
    origin = np.array([rng.uniform(0.35, 0.65) * layout.width, rng.uniform(1.2, 1.7), layout.camera_z])
    yaw, pitch = np.radians(rng.uniform(-20, 20)), np.radians(rng.uniform(-18, -4))
    fov = np.radians(rng.uniform(55, 70))
    return Camera.looking(origin, yaw, pitch, focal=max(height, width) / 2 / np.tan(fov / 2))


# ----------------------------------------------------------------------------- rendering


def render_scene(seed: int, height: int, width: int) -> SceneSample:
    """Render the scene of ``seed`` at ``height`` × ``width``; the same seed always gives the same scene.

    Room, furniture, materials and light do not depend on the resolution, so one seed rendered at
    two sizes shows the same view.
    """
    if height < 1 or width < 1:
        raise ValueError(f"render size must be positive, got {height}x{width}")
    rng = np.random.default_rng(seed)
    scene = SYNTHETIC_SCENES[int(rng.integers(len(SYNTHETIC_SCENES)))]
    layout = _room(rng, scene)
    camera = _camera(rng, layout, height, width)
    half_width = width / 2 / camera.focal
    room_materials = [_room_material(rng, scene, SYNTHETIC_CLASSES[class_id]) for class_id in _FACE_CLASS]
    room_materials[1] = room_materials[4] = room_materials[5] = room_materials[0]  # one wall finish per room

    primitives: list[Primitive] = []
    objects: list[str] = []
    for class_name, required in _object_list(rng, scene):
        shape = FURNITURE[class_name](rng)
        spot = _place(rng, shape, layout, camera, half_width, required)
        if spot is not None:
            primitives.extend(_to_world(shape, class_name, spot, rng))
            objects.append(class_name)

    light = np.array(
        [rng.uniform(0.2, 0.8) * layout.width, layout.height - 0.1, rng.uniform(0.2, 0.8) * layout.depth]
    )
    light_colour, ambient = rng.uniform(0.9, 1.1, size=3), rng.uniform(0.25, 0.45)

    room_size = np.array([layout.width, layout.height, layout.depth])
    depth, surface, dirs = cast(camera, room_size, primitives, height, width)
    points = (camera.origin + depth[..., None] * dirs).reshape(-1, 3)
    surface = surface.reshape(-1)
    class_of = np.concatenate([_FACE_CLASS, [p.class_id for p in primitives]]).astype(np.uint8)
    colour, normals = np.empty_like(points), np.empty_like(points)
    order = np.argsort(surface, kind="stable")  # pixels grouped by the surface they see
    keys, starts = np.unique(surface[order], return_index=True)
    # metres of surface per pixel: distance / focal, stretched where the surface is seen at a grazing angle
    distance_to_camera = np.linalg.norm(points - camera.origin, axis=-1)
    rays = (points - camera.origin) / distance_to_camera[:, None]
    for key, pixels in zip(keys, np.split(order, starts[1:]), strict=True):
        if key < 0:  # a room face
            material = room_materials[key + 6]
            normals[pixels] = ROOM_FACE_NORMALS[key + 6]
        else:
            material = primitives[key].material
            normals[pixels] = surface_normals(primitives[key], points[pixels])
        facing = np.abs((normals[pixels] * rays[pixels]).sum(axis=-1))
        footprint = distance_to_camera[pixels] / camera.focal / np.maximum(facing, 0.25)
        colour[pixels] = albedo(material, points[pixels], footprint)

    to_light = light - points
    distance = np.linalg.norm(to_light, axis=-1)
    lambert = np.clip((normals * to_light).sum(axis=-1) / distance, 0.0, None) / (1.0 + 0.05 * distance**2)
    shade = ambient + (1.0 - ambient) * 1.6 * lambert
    rgb = colour * shade[:, None] * light_colour + rng.normal(0.0, 0.01, size=colour.shape)
    return SceneSample(
        rgb=(np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(height, width, 3),
        label=class_of[surface + 6].reshape(height, width),
        depth=depth.astype(np.float32),
        scene=scene,
        objects=objects,
    )
