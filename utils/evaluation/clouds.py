"""The defect on the point cloud (docs/inspecting.md, "The defect on the cloud"): a part's valid points coloured by
its anomaly map, as a PLY file any point-cloud viewer reads (CloudCompare, MeshLab, Open3D), and rendered to PNG
from the sensor's view and an oblique one for the report.

PLY, binary little-endian, one vertex per valid point (a pixel whose coordinates are not all 0), in raster order:
``x y z`` (float32, the cloud's units), ``red green blue`` (uint8, the overlays' colour scale of
:func:`utils.evaluation.visualization.colormap` over ``anomaly / scale``), ``anomaly`` (float32, the map at that
pixel) and ``score`` (float32, the part's image score, the same on every vertex). The header's comments name the
part, its score, the colour scale and the threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from utils.data.io import atomic_path
from utils.evaluation.visualization import colormap

VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                   ("anomaly", "<f4"), ("score", "<f4")])
PLY_TYPES = {"<f4": "float", "u1": "uchar"}
OBLIQUE_DEGREES = (35.0, -25.0)  # the oblique render: turned about the x axis, then the y axis


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels that hold a point (MVTec 3D-AD marks a missing one (0, 0, 0))."""
    return ~(xyz == 0).all(axis=-1)


def anomaly_colours(values: np.ndarray, scale: float) -> np.ndarray:
    """(..., 3) uint8: the overlays' colour scale of ``values / scale`` (0: dark blue, 1 and above: dark red)."""
    return colormap(np.clip(values / (scale or 1.0), 0.0, 1.0))


def write_anomaly_ply(path: Path, xyz: np.ndarray, anomaly_map: np.ndarray, scale: float, score: float,
                      name: str = "", threshold: float | None = None) -> Path:
    """Write the valid points of an organised cloud (H, W, 3), coloured by ``anomaly_map`` (H, W), atomically.

    Raises:
        ValueError: the map and the cloud differ in size.
    """
    if anomaly_map.shape != xyz.shape[:2]:
        raise ValueError(f"anomaly map {anomaly_map.shape} and cloud {xyz.shape[:2]} differ in size")
    valid = valid_points(xyz)
    vertices = np.empty(int(valid.sum()), dtype=VERTEX)
    for axis, field in enumerate("xyz"):
        vertices[field] = xyz[..., axis][valid]
    colours = anomaly_colours(anomaly_map[valid], scale)
    for channel, field in enumerate(("red", "green", "blue")):
        vertices[field] = colours[:, channel]
    vertices["anomaly"] = anomaly_map[valid]
    vertices["score"] = score
    comments = [f"part {name}", f"score {score:.6g}", f"colour scale 0..{scale:.6g} (anomaly map)"]
    if threshold is not None:
        comments.append(f"threshold {threshold:.6g}")
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments),
              f"element vertex {len(vertices)}",
              *(f"property {PLY_TYPES[VERTEX[f].str.replace('|', '')]} {f}" for f in VERTEX.names), "end_header"]
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            handle.write(("\n".join(header) + "\n").encode("ascii"))
            handle.write(vertices.tobytes())
    return path


def _rotation(degrees_x: float, degrees_y: float) -> np.ndarray:
    ax, ay = math.radians(degrees_x), math.radians(degrees_y)
    about_x = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    about_y = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return about_y @ about_x


def render_points(points: np.ndarray, colours: np.ndarray, size: int = 320,
                  view: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A (size, size, 3) uint8 picture of coloured points (N, 3) seen along +z (the sensor's direction: MVTec 3D-AD's
    camera looks along +z from the origin) after turning them by ``view`` (degrees about x, then y) around their
    centre: orthographic, nearest point in front, each point a small square, background white."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    if not len(points):
        return image
    centred = points - points.mean(axis=0)
    turned = centred @ _rotation(*view).T
    extent = np.abs(turned[:, :2]).max() or 1.0
    pixels = np.clip(((turned[:, :2] / extent) * 0.45 + 0.5) * (size - 1), 0, size - 1).astype(int)
    order = np.argsort(-turned[:, 2])  # far first (larger z is farther from the sensor): near points paint last
    dot = max(1, size // 160)
    for dy in range(-dot + 1, dot):
        for dx in range(-dot + 1, dot):
            rows = np.clip(pixels[order, 1] + dy, 0, size - 1)
            cols = np.clip(pixels[order, 0] + dx, 0, size - 1)
            image[rows, cols] = colours[order]
    return image


def render_views(xyz: np.ndarray, anomaly_map: np.ndarray, scale: float, size: int = 320
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The sensor's view and the oblique view of a part's valid points coloured by its anomaly map."""
    valid = valid_points(xyz)
    points, colours = xyz[valid].astype(np.float64), anomaly_colours(anomaly_map[valid], scale)
    return render_points(points, colours, size), render_points(points, colours, size, OBLIQUE_DEGREES)
