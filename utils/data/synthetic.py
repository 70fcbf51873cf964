"""A synthetic dataset in the MVTec 3D-AD layout (docs/data.md, "Synthetic data"), for tests and the demo.

Each sample is a physically plausible scene: a slightly tilted table 0.45–0.55 m from a pinhole
camera, an object on it (``dome``, ``torus`` or striped ``box``) whose pose, size and surface
texture vary from sample to sample, sensor noise on the depth, and invalid pixels (steep
flanks, random dropouts) stored as (0, 0, 0). The RGB image is the object's albedo lit by a
Lambertian light using the normals of the *nominal* surface.

Test defects come in three kinds, each localised on the object and marked in the gt mask:

* geometric only — ``dent``, ``bump``, ``crack``: the depth changes, the image does not;
* colour only — ``stain``: the image changes, the depth does not;
* ``combined``: a low bump with a discolouration on the same spot.

Defect sizes are a fixed fraction of the image (so they survive resizing to small network
inputs) and their magnitudes are small against the sample-to-sample variation of pose and
texture, so global statistics cannot separate good from defective samples; a detector has to
look locally.

Usage::

    python -m utils.data.synthetic OUT_DIR [--classes dome torus box | N] [--n_train 12] [--n_val 4]
        [--n_test 15] [--size H W] [--seed 0] [--defects ...] [--background table|none]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from utils.logs import setup_logging

logger = logging.getLogger(__name__)

SHAPES = ("dome", "torus", "box")
DEFECT_TYPES = ("dent", "bump", "crack", "stain", "combined")
GEOMETRIC_DEFECTS = frozenset({"dent", "bump", "crack", "combined"})
COLOUR_DEFECTS = frozenset({"stain", "combined"})
MARKER_FILE = "synthetic.json"
GENERATOR_VERSION = 1

# Object albedo (RGB in [0, 1]) and height as a multiple of its footprint radius.
_ALBEDO = {"dome": (0.86, 0.56, 0.34), "torus": (0.78, 0.60, 0.38), "box": (0.22, 0.40, 0.72)}
_HEIGHT_PER_RADIUS = {"dome": 1.0, "torus": 0.7, "box": 0.7}
_TABLE_ALBEDO = (0.36, 0.36, 0.38)
_DEPTH_NOISE_M = 2e-5  # 0.02 mm, a structured-light sensor's order of magnitude


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generator writes.

    Attributes:
        classes: object shapes to generate, each one class (see :data:`SHAPES`).
        n_train: training samples per class (all good).
        n_val: validation samples per class (all good).
        n_test: test samples per class; a third good (at least one), the rest spread over ``defects``.
        size: (H, W) of every image; non-square is the default, as in MVTec 3D-AD.
        seed: base seed; every sample has its own generator derived from it and the sample's identity.
        defects: defect types used in the test split (see :data:`DEFECT_TYPES`).
        background: ``table`` keeps the table in the cloud (raw data); ``none`` stores table pixels as
            invalid, as MVTec 3D-AD's background-removed clouds do.
        pixel_pitch_mm: size of a pixel on the table, in millimetres.
    """

    classes: tuple[str, ...] = SHAPES
    n_train: int = 12
    n_val: int = 4
    n_test: int = 15
    size: tuple[int, int] = (160, 200)
    seed: int = 0
    defects: tuple[str, ...] = DEFECT_TYPES
    background: Literal["table", "none"] = "table"
    pixel_pitch_mm: float = 0.2

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown synthetic class(es) {unknown}; choose from {SHAPES}")
        unknown = [d for d in self.defects if d not in DEFECT_TYPES]
        if unknown or not self.defects:
            raise ValueError(f"defects must be a non-empty subset of {DEFECT_TYPES}, got {self.defects}")
        if self.n_train < 1 or self.n_val < 0 or self.n_test < 2:
            raise ValueError("need n_train >= 1, n_val >= 0 and n_test >= 2 (at least one good and one defect)")
        if min(self.size) < 32:
            raise ValueError(f"size must be at least 32x32 pixels, got {self.size}")
        if self.background not in ("table", "none"):
            raise ValueError(f"background must be 'table' or 'none', got {self.background!r}")

    def test_counts(self) -> dict[str, int]:
        """Number of test samples per folder: ``good`` first, then each defect type that gets any."""
        n_good = max(1, self.n_test // 3)
        n_defective = self.n_test - n_good
        k = len(self.defects)
        counts = {"good": n_good}
        for i, defect in enumerate(self.defects):
            count = n_defective // k + (i < n_defective % k)
            if count:
                counts[defect] = count
        return counts


@dataclass
class SyntheticSample:
    """One rendered scene.

    Attributes:
        rgb: (H, W, 3) uint8 image.
        xyz: (H, W, 3) float32 organized cloud in metres, invalid pixels (0, 0, 0).
        gt: (H, W) bool defect mask.
    """

    rgb: np.ndarray
    xyz: np.ndarray
    gt: np.ndarray


def sample_rng(seed: int, class_name: str, split: str, defect: str, index: int) -> np.random.Generator:
    """The generator of one sample: depends on its identity only, not on what else is generated."""
    key = zlib.crc32(f"{class_name}/{split}/{defect}/{index}".encode())
    return np.random.default_rng([seed, key])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return noise / (noise.std() + 1e-12)


def _object_height(shape: str, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Normalised height in [0, 1] of an object over its local coordinates (a, b) in radii."""
    if shape == "dome":
        aspect = rng.uniform(0.78, 0.9)
        return np.sqrt(np.clip(1.0 - a**2 - (b / aspect) ** 2, 0.0, None))
    if shape == "torus":
        rho = np.sqrt(a**2 + (b / rng.uniform(0.9, 1.0)) ** 2)
        return np.sqrt(np.clip(1.0 - ((rho - 0.62) / 0.34) ** 2, 0.0, None))
    # box: a superellipse footprint with rounded edges
    q = np.abs(a) ** 6 + np.abs(b / 0.68) ** 6
    return np.clip((1.0 - q) * 5.0, 0.0, 1.0) ** 0.5


def _object_albedo(shape: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 3) albedo of the object surface; the box carries printed stripes fixed to its frame."""
    albedo = np.broadcast_to(np.array(_ALBEDO[shape]), a.shape + (3,)).copy()
    if shape == "box":
        stripes = (np.sin(2 * np.pi * 2.5 * a) > 0.35)[..., None]
        albedo = np.where(stripes, np.array((0.9, 0.88, 0.82)), albedo)
    return albedo


def _crack_mask(rng: np.random.Generator, centre: tuple[float, float], length: float, half_width: float,
                shape: tuple[int, int]) -> np.ndarray:
    """Pixels within ``half_width`` of a random, gently curving polyline of ``length`` pixels."""
    line = np.zeros(shape, dtype=bool)
    angle = rng.uniform(0, 2 * np.pi)
    # walk from the centre in both directions so the crack is centred on the chosen spot
    for direction in (0.0, np.pi):
        y, x, theta = centre[0], centre[1], angle + direction
        for _ in range(int(length)):
            theta += rng.normal(0.0, 0.12)
            y, x = y + 0.5 * np.sin(theta), x + 0.5 * np.cos(theta)
            iy, ix = round(y), round(x)
            if 0 <= iy < shape[0] and 0 <= ix < shape[1]:
                line[iy, ix] = True
    return ndimage.distance_transform_edt(~line) <= half_width


def _defect(rng: np.random.Generator, defect: str, height: np.ndarray, obj_height_m: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A defect on the object's upper surface.

    Returns:
        (delta height in metres (H, W), colour blend weight in [0, 1] (H, W), gt mask (H, W)).
    """
    h, w = height.shape
    side = min(h, w)
    candidates = np.argwhere(height > 0.45)
    centre = candidates[rng.integers(len(candidates))].astype(float)
    radius = rng.uniform(0.05, 0.07) * side
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (radius / 2) ** 2))
    on_object = height > 0.05
    delta = np.zeros((h, w))
    colour = np.zeros((h, w))
    gt = np.zeros((h, w), dtype=bool)
    if defect in ("dent", "bump", "combined"):
        depth = rng.uniform(0.08, 0.12) * obj_height_m * (0.6 if defect == "combined" else 1.0)
        delta = (-depth if defect == "dent" else depth) * blob
        gt |= blob > 0.1
    if defect == "crack":
        half_width = max(1.0, 0.012 * side)
        mask = _crack_mask(rng, tuple(centre), rng.uniform(0.18, 0.26) * side, half_width, (h, w))
        delta = -rng.uniform(0.08, 0.12) * obj_height_m * ndimage.gaussian_filter(mask.astype(float), 0.6)
        gt |= mask
    if defect in COLOUR_DEFECTS:
        # an irregular blotch: the blob's level set perturbed by smooth noise
        # (a combined defect discolours the whole bump)
        level = 0.1 if defect == "combined" else 0.4
        stain = blob * (1.0 + 0.4 * _smooth_noise(rng, (h, w), radius / 3)) > level
        colour = ndimage.gaussian_filter(stain.astype(float), 1.0, truncate=2.0) * rng.uniform(0.55, 0.7)
        gt |= stain
    return delta * on_object, colour * on_object, gt & on_object


def render_sample(
    shape: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (160, 200),
    defect: str | None = None,
    background: Literal["table", "none"] = "table",
    pixel_pitch_mm: float = 0.2,
) -> SyntheticSample:
    """Render one scene of ``shape`` with an optional defect.

    The defect draws from its own child generator, so the same ``rng`` state renders the same
    scene with and without a defect: the two differ only where the defect is.
    """
    rng, defect_rng = rng.spawn(2)
    h, w = size
    side = min(h, w)
    pitch = pixel_pitch_mm * 1e-3
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    cy, cx = (h - 1) / 2, (w - 1) / 2

    # pose of the object: position, rotation, scale
    oy, ox = cy + rng.uniform(-0.06, 0.06) * side, cx + rng.uniform(-0.06, 0.06) * side
    theta = rng.uniform(-np.pi, np.pi) if shape != "box" else rng.uniform(-0.3, 0.3)
    radius_px = 0.3 * side * rng.uniform(0.92, 1.08)
    a = ((xx - ox) * np.cos(theta) + (yy - oy) * np.sin(theta)) / radius_px
    b = (-(xx - ox) * np.sin(theta) + (yy - oy) * np.cos(theta)) / radius_px
    height = _object_height(shape, a, b, rng)
    obj_height_m = _HEIGHT_PER_RADIUS[shape] * radius_px * pitch * rng.uniform(0.95, 1.05)
    surface_m = height * obj_height_m + 0.015 * obj_height_m * _smooth_noise(rng, size, 0.04 * side) * (height > 0)

    delta_m, stain, gt = (np.zeros(size), np.zeros(size), np.zeros(size, dtype=bool))
    if defect is not None:
        delta_m, stain, gt = _defect(defect_rng, defect, height, obj_height_m)

    # RGB: albedo (object, table) shaded with the normals of the nominal surface
    albedo = np.where((height > 0)[..., None], _object_albedo(shape, a, b), np.array(_TABLE_ALBEDO))
    albedo = albedo * (1.0 + 0.06 * _smooth_noise(rng, size, 1.5))[..., None]
    stain_colour = albedo * np.array((0.55, 0.42, 0.35))
    albedo = albedo * (1 - stain[..., None]) + stain_colour * stain[..., None]
    dh_dy, dh_dx = np.gradient(surface_m, pitch)
    normals = np.stack([-dh_dx, -dh_dy, np.ones(size)], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    light = np.array((0.35, -0.45, 1.0)) + rng.normal(0.0, 0.03, 3)
    shading = 0.35 + 0.65 * np.clip(normals @ (light / np.linalg.norm(light)), 0.0, None)
    rgb = albedo * shading[..., None] * 255.0 + rng.normal(0.0, 1.5, size + (3,))
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    # xyz: pinhole camera looking at a tilted table; the object rises towards the camera
    z0 = 0.5 + rng.uniform(-0.002, 0.002)
    tilt_x, tilt_y = np.tan(np.deg2rad(2.5 + rng.normal(0, 0.3))), np.tan(np.deg2rad(-1.5 + rng.normal(0, 0.3)))
    table = z0 + tilt_x * (xx - cx) * pitch + tilt_y * (yy - cy) * pitch
    z = table - (surface_m + delta_m) + rng.normal(0.0, _DEPTH_NOISE_M, size)
    focal = z0 / pitch
    xyz = np.stack([(xx - cx) * z / focal, (yy - cy) * z / focal, z], axis=-1).astype(np.float32)

    # invalid pixels: steep flanks (the sensor sees no stripe pattern there) and random dropouts
    invalid = np.hypot(dh_dx, dh_dy) > 2.5
    dropouts = rng.random(size) < 0.003
    for _ in range(rng.integers(2, 5)):
        py, px, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(1.0, 3.0)
        dropouts |= (yy - py) ** 2 + (xx - px) ** 2 <= r * r
    invalid |= dropouts
    if background == "none":
        invalid |= height <= 0
    xyz[invalid] = 0.0
    return SyntheticSample(rgb=rgb, xyz=xyz, gt=gt)


def _write_sample(folder: Path, stem: str, sample: SyntheticSample, with_gt: bool) -> None:
    for sub in ("rgb", "xyz") + (("gt",) if with_gt else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.rgb).save(folder / "rgb" / f"{stem}.png")
    tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", sample.xyz, photometric="rgb")
    if with_gt:
        Image.fromarray(sample.gt.astype(np.uint8) * 255).save(folder / "gt" / f"{stem}.png")


def _prepare_output(out_dir: Path, classes: Sequence[str]) -> None:
    """Create ``out_dir`` or reuse one this generator wrote; never touch anything else."""
    marker = out_dir / MARKER_FILE
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise FileExistsError(
            f"{out_dir} exists, is not empty and was not written by utils.data.synthetic (no {MARKER_FILE}); "
            "choose another output folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for class_name in classes:  # regenerate classes from scratch so no stale sample survives
        if (out_dir / class_name).exists():
            shutil.rmtree(out_dir / class_name)


def generate_dataset(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write the dataset described by ``config`` under ``out_dir`` and return ``out_dir``.

    Deterministic: the same config gives byte-identical files.
    """
    out_dir = Path(out_dir)
    _prepare_output(out_dir, config.classes)
    jobs: list[tuple[str, str, str, int]] = []
    for class_name in config.classes:
        jobs += [(class_name, "train", "good", i) for i in range(config.n_train)]
        jobs += [(class_name, "validation", "good", i) for i in range(config.n_val)]
        for defect, count in config.test_counts().items():
            jobs += [(class_name, "test", defect, i) for i in range(count)]
    for class_name, split, defect, index in tqdm(jobs, desc="synthetic samples", unit="sample"):
        rng = sample_rng(config.seed, class_name, split, defect, index)
        sample = render_sample(
            class_name, rng, config.size, None if defect == "good" else defect,
            config.background, config.pixel_pitch_mm,
        )
        _write_sample(out_dir / class_name / split / defect, f"{index:03d}", sample, with_gt=split == "test")

    marker = out_dir / MARKER_FILE
    previous = json.loads(marker.read_text())["classes"] if marker.is_file() else {}
    previous.update({c: asdict(config) for c in config.classes})
    metadata = {"generator": "utils.data.synthetic", "version": GENERATOR_VERSION, "classes": previous}
    marker.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d samples of %s to %s", len(jobs), ", ".join(config.classes), out_dir)
    return out_dir


def _parse_classes(values: Sequence[str]) -> tuple[str, ...]:
    """``--classes`` takes shape names or a single count N (the first N shapes)."""
    if len(values) == 1 and values[0].isdigit():
        count = int(values[0])
        if not 1 <= count <= len(SHAPES):
            raise argparse.ArgumentTypeError(f"--classes N must be between 1 and {len(SHAPES)}")
        return SHAPES[:count]
    return tuple(values)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m utils.data.synthetic",
        description="Write a synthetic dataset in the MVTec 3D-AD layout.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--classes", nargs="+", default=list(defaults.classes),
                        help=f"shapes to generate ({', '.join(SHAPES)}) or a count N")
    parser.add_argument("--n_train", type=int, default=defaults.n_train)
    parser.add_argument("--n_val", type=int, default=defaults.n_val)
    parser.add_argument("--n_test", type=int, default=defaults.n_test)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=list(defaults.size))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--defects", nargs="+", choices=DEFECT_TYPES, default=list(defaults.defects))
    parser.add_argument("--background", choices=("table", "none"), default=defaults.background)
    parser.add_argument("--pixel_pitch_mm", type=float, default=defaults.pixel_pitch_mm)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = SyntheticConfig(
            classes=_parse_classes(args.classes), n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
            size=tuple(args.size), seed=args.seed, defects=tuple(args.defects), background=args.background,
            pixel_pitch_mm=args.pixel_pitch_mm,
        )
        generate_dataset(args.out_dir, config)
    except (ValueError, FileExistsError, argparse.ArgumentTypeError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
