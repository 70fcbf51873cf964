"""Heatmap panels for people to look at: RGB | depth | ground truth | anomaly overlay (numpy + PIL only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from utils.data.io import atomic_path

# Anchor colours of a perceptually ordered map (dark blue → cyan → yellow → red), interpolated linearly.
_COLORMAP_ANCHORS = np.array(
    [[0.19, 0.07, 0.23], [0.16, 0.47, 0.93], [0.10, 0.83, 0.74], [0.64, 0.99, 0.24], [0.98, 0.73, 0.22],
     [0.90, 0.27, 0.04], [0.48, 0.02, 0.01]]
)
TILE = 224  # panels are drawn at least this large, whatever the network resolution


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (H, W) → (H, W, 3)."""
    position = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_COLORMAP_ANCHORS) - 2)
    frac = (position - low)[..., None]
    colours = _COLORMAP_ANCHORS[low] * (1 - frac) + _COLORMAP_ANCHORS[low + 1] * frac
    return (colours * 255 + 0.5).astype(np.uint8)


def depth_image(xyz: np.ndarray) -> np.ndarray:
    """Grey rendering of an organized cloud (H, W, 3): near is bright, invalid pixels black."""
    z = xyz[..., 2]
    valid = (xyz != 0).all(axis=-1)
    image = np.zeros(z.shape, dtype=np.uint8)
    if valid.any():
        low, high = np.percentile(z[valid], [1, 99])
        image[valid] = (np.clip((high - z[valid]) / max(high - low, 1e-9), 0, 1) * 200 + 55).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)


def with_contour(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """The image with the outline of ``mask`` drawn in ``colour``."""
    outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, mask.shape[0] // 112))
    out = rgb.copy()
    out[outline] = colour
    return out


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image blended with the colour-mapped heat (values in [0, 1])."""
    return (rgb * (1 - alpha) + colormap(heat) * alpha).astype(np.uint8)


def _tile(image: np.ndarray, size: int) -> Image.Image:
    tile = Image.fromarray(image)
    return tile if tile.size == (size, size) else tile.resize((size, size), Image.NEAREST)


def save_tiles(path: str | Path, rows: list[list[np.ndarray]], labels: list[str], title: str = "") -> None:
    """Write a PNG grid of equally sized (S, S, 3) uint8 tiles, labelled per column, atomically."""
    size = max(TILE, rows[0][0].shape[0])
    header = 18 if title else 0
    grid = Image.new("RGB", (size * len(labels), size * len(rows) + header), "white")
    draw = ImageDraw.Draw(grid)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            grid.paste(_tile(tile, size), (c * size, header + r * size))
            draw.text((c * size + 4, header + r * size + 3), labels[c], fill="white")
    if title:
        draw.text((4, 3), title, fill="black")
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def save_panel(path: str | Path, rgb: np.ndarray, xyz: np.ndarray | None, gt: np.ndarray, heat: np.ndarray,
               title: str) -> None:
    """Write a PNG panel: RGB | depth | RGB with gt outline | heat overlay with gt outline.

    Args:
        rgb: (S, S, 3) uint8 image.
        xyz: (S, S, 3) cloud or None.
        gt: (S, S) bool mask.
        heat: (S, S) anomaly map scaled to [0, 1].
        title: text above the panel.
    """
    tiles = [rgb, depth_image(xyz) if xyz is not None else np.zeros_like(rgb), with_contour(rgb, gt),
             with_contour(overlay(rgb, heat), gt, (255, 255, 255))]
    save_tiles(path, [tiles], ["RGB", "depth", "ground truth", "anomaly map"], title)
