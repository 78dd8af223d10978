"""Depth maps as coloured 3D point clouds: pinhole back-projection and binary PLY files (MeshLab, Open3D,
Blender and the web app's 3D view read them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NYU_FOCAL = 518.8579
"""NYUv2's focal length in pixels at its 640-pixel width: the default focal length scales it to the image width."""


def default_focal(width: int) -> float:
    """A focal length in pixels for an image ``width`` pixels wide, NYUv2's field of view (about 63° across)."""
    return NYU_FOCAL * width / 640.0


def depth_to_points(
    depth: np.ndarray, image: np.ndarray, focal: float, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project an H×W depth map (metres, z along the optical axis) through a pinhole camera with ``focal``
    pixels and the principal point at the centre: (N, 3) float32 points (x right, y up, z towards the viewer,
    so the camera looks down -z) and their (N, 3) uint8 colours. Pixels without depth (<= 0 or not finite)
    are dropped; ``max_points`` keeps every k-th row and column so at most that many remain."""
    if focal <= 0 or not np.isfinite(focal):
        raise ValueError(f"focal: {focal} is not a positive focal length in pixels")
    depth = np.asarray(depth, dtype=np.float32)
    height, width = depth.shape
    step = 1
    if max_points is not None and height * width > max_points:
        step = int(np.ceil(np.sqrt(height * width / max_points)))
    v, u = np.mgrid[0:height:step, 0:width:step]
    z = depth[v, u]
    valid = np.isfinite(z) & (z > 0)
    u, v, z = u[valid], v[valid], z[valid]
    x = (u + 0.5 - width / 2) * z / focal
    y = -(v + 0.5 - height / 2) * z / focal
    points = np.stack([x, y, -z], axis=-1).astype(np.float32)
    return points, np.asarray(image)[v, u].astype(np.uint8)


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray) -> Path:
    """Binary little-endian PLY of coloured vertices (no faces)."""
    if len(points) != len(colors):
        raise ValueError(f"{len(points)} points but {len(colors)} colours")
    vertex = np.empty(
        len(points),
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")],
    )
    vertex["x"], vertex["y"], vertex["z"] = points.T
    vertex["red"], vertex["green"], vertex["blue"] = colors.T
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment iedp depth point cloud\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    path = Path(path)
    with open(path, "wb") as file:
        file.write(header.encode("ascii"))
        file.write(vertex.tobytes())
    return path


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Points and colours of a file :func:`write_ply` wrote (for tests and round trips)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    count = int(
        next(
            line for line in data[:end].decode("ascii").splitlines() if line.startswith("element vertex")
        ).split()[-1]
    )
    vertex = np.frombuffer(
        data[end:],
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")],
        count=count,
    )
    points = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=-1)
    return points, np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=-1)
