"""Background removal for MVTec 3D-AD (docs/data.md, "Background removal"), without Open3D.

    python processing/preprocess_mvtec.py RAW_ROOT --out OUT_ROOT [--workers N] [--seed 0] [--pad_rgb_gt]

Per organized cloud, the reference algorithm with its parameters:

1. the valid points of the 10-pixel border strips sample the table plane;
2. RANSAC (1000 hypotheses, each a least-squares plane through 50 random sample points; inliers closer than
   4 mm; most inliers wins, ties by lower mean inlier distance), then a least-squares refit on the winner's inliers
   (what Open3D's ``segment_plane(0.004, 50, 1000)`` does);
3. every point closer than 5 mm to the plane is removed (set to 0, 0, 0);
4. the cloud is zero-padded to a centred square whose side is the larger of H and W rounded up to 100;
5. DBSCAN (eps 6 mm, 30 samples, scikit-learn semantics) keeps the largest cluster — the largest *non-noise*
   cluster (the reference could keep the noise points).

RAW_ROOT is never modified. OUT_ROOT receives the cleaned clouds with the rgb and gt files next to them (zero-padded
like the cloud with ``--pad_rgb_gt``) and a marker file ``preprocessed.json`` with the parameters. Every file has
its own seeded random generator, so the output is identical whatever the number of workers and run after run.
Files that fail are reported with the reason at the end; the others are still processed; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy.spatial import cKDTree
from tqdm import tqdm

from utils.data.io import DatasetError, atomic_path, read_rgb, read_xyz, write_text_atomic
from utils.data.mvtec3d import PREPROCESSED_MARKER
from utils.data.transforms import pad_centred
from utils.logs import setup_logging

logger = logging.getLogger("preprocess_mvtec")

VERSION = 1


@dataclass(frozen=True)
class BackgroundRemovalConfig:
    """The reference parameters (metres and pixels)."""

    border: int = 10
    ransac_threshold: float = 0.004
    ransac_n: int = 50
    ransac_iterations: int = 1000
    plane_cut: float = 0.005
    pad_multiple: int = 100
    dbscan_eps: float = 0.006
    dbscan_min_samples: int = 30


def valid_mask(xyz: np.ndarray) -> np.ndarray:
    """Pixels whose x, y and z are all non-zero. (H, W, 3) → (H, W) bool."""
    return (xyz != 0).all(axis=-1)


def border_points(xyz: np.ndarray, border: int) -> np.ndarray:
    """Valid points of the first/last ``border`` rows and columns: (M, 3) float64."""
    strip = np.zeros(xyz.shape[:2], dtype=bool)
    strip[:border], strip[-border:], strip[:, :border], strip[:, -border:] = True, True, True, True
    return xyz[strip & valid_mask(xyz)].astype(np.float64)


def fit_plane(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares planes through point sets: centroid and smallest principal direction.

    Args:
        points: (..., n, 3).

    Returns:
        (unit normals (..., 3), offsets d (...)) with n·p + d = 0 on the plane.
    """
    centroid = points.mean(axis=-2)
    centred = points - centroid[..., None, :]
    covariance = np.swapaxes(centred, -1, -2) @ centred
    _, vectors = np.linalg.eigh(covariance)
    normal = vectors[..., :, 0]  # eigenvalues ascending: the first vector is the smallest direction
    return normal, -(normal * centroid).sum(axis=-1)


def ransac_plane(points: np.ndarray, config: BackgroundRemovalConfig, rng: np.random.Generator
                 ) -> tuple[np.ndarray, float]:
    """The table plane (normal, d) among ``points`` (M, 3), refit on the inliers of the best hypothesis."""
    if len(points) < config.ransac_n:
        raise ValueError(f"only {len(points)} valid border points, fewer than the {config.ransac_n} RANSAC needs")
    samples = np.stack([rng.choice(len(points), config.ransac_n, replace=False)
                        for _ in range(config.ransac_iterations)])
    normals, offsets = fit_plane(points[samples])  # (iterations, 3), (iterations,)
    best_key, best = (-1, math.inf), 0
    for start in range(0, config.ransac_iterations, 50):  # (50, M) distances at a time
        distance = np.abs(normals[start : start + 50] @ points.T + offsets[start : start + 50, None])
        inliers = distance < config.ransac_threshold
        counts = inliers.sum(axis=1)
        mean_distance = np.where(inliers, distance, 0).sum(axis=1) / np.maximum(counts, 1)
        for i, (count, mean) in enumerate(zip(counts, mean_distance)):
            if count > best_key[0] or (count == best_key[0] and mean < best_key[1]):
                best_key, best = (int(count), float(mean)), start + i
    inliers = np.abs(points @ normals[best] + offsets[best]) < config.ransac_threshold
    normal, offset = fit_plane(points[inliers])
    return normal, float(offset)


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad (H, W[, C]) to a centred square whose side is max(H, W), each rounded up to ``multiple``."""
    height, width = array.shape[:2]
    return pad_centred(array, max(math.ceil(height / multiple), math.ceil(width / multiple)) * multiple)


def dbscan_labels(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN cluster labels (−1 = noise) with scikit-learn's semantics, in memory O(N).

    Core points have at least ``min_samples`` points (themselves included) within ``eps``; clusters are the
    connected components of core points closer than ``eps``; a border point joins the cluster of its nearest core
    point (scikit-learn assigns it to the first cluster that reaches it: the two differ only for a border point
    within reach of two clusters). Components are found on a grid of cells of side eps/√3, inside which all
    points are within ``eps`` of each other, so only neighbouring cells need distance queries — instead of
    scikit-learn's list of every point's neighbours (gigabytes for an MVTec cloud).
    """
    tree = cKDTree(points)
    core = tree.query_ball_point(points, eps, return_length=True, workers=-1) >= min_samples
    labels = np.full(len(points), -1, dtype=np.int64)
    if not core.any():
        return labels
    core_points = points[core]
    cells, cell_of = np.unique(np.floor(core_points / (eps / math.sqrt(3))).astype(np.int64), axis=0,
                               return_inverse=True)
    cell_of = cell_of.ravel()
    members = np.split(np.argsort(cell_of, kind="stable"), np.cumsum(np.bincount(cell_of))[:-1])
    parent = np.arange(len(cells))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cell_index = {tuple(c): i for i, c in enumerate(cells)}
    trees: dict[int, cKDTree] = {}
    offsets = [(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3) if (a, b, c) > (0, 0, 0)]
    for i, cell in enumerate(cells):
        for offset in offsets:  # each unordered pair of cells once
            j = cell_index.get((cell[0] + offset[0], cell[1] + offset[1], cell[2] + offset[2]))
            if j is None or find(i) == find(j):
                continue
            if j not in trees:
                trees[j] = cKDTree(core_points[members[j]])
            distance, _ = trees[j].query(core_points[members[i]], k=1, distance_upper_bound=eps * (1 + 1e-12))
            if np.any(distance <= eps):
                parent[find(i)] = find(j)
    roots = np.array([find(i) for i in range(len(cells))])
    core_labels = np.unique(roots, return_inverse=True)[1].ravel()[cell_of]
    labels[core] = core_labels
    border = ~core
    distance, nearest = cKDTree(core_points).query(points[border], k=1, distance_upper_bound=eps * (1 + 1e-12))
    reached = distance <= eps
    border_labels = np.full(border.sum(), -1, dtype=np.int64)
    border_labels[reached] = core_labels[nearest[reached]]
    labels[border] = border_labels
    return labels


def remove_background(xyz: np.ndarray, config: BackgroundRemovalConfig, rng: np.random.Generator) -> np.ndarray:
    """The cleaned, padded cloud (a new array; ``xyz`` is not modified)."""
    normal, offset = ransac_plane(border_points(xyz, config.border), config, rng)
    cleaned = xyz.copy()
    valid = valid_mask(cleaned)
    cleaned[valid & (np.abs(cleaned.astype(np.float64) @ normal + offset) < config.plane_cut)] = 0.0
    cleaned = pad_to_multiple(cleaned, config.pad_multiple)
    valid = valid_mask(cleaned)
    if not valid.any():
        raise ValueError("no points left after removing the table plane")
    labels = dbscan_labels(cleaned[valid].astype(np.float64), config.dbscan_eps, config.dbscan_min_samples)
    if (labels < 0).all():
        raise ValueError("no cluster left after removing the table plane (all remaining points are noise)")
    largest = np.argmax(np.bincount(labels[labels >= 0]))  # ties: the lowest label
    keep = np.zeros(valid.shape, dtype=bool)
    keep[valid] = labels == largest
    cleaned[~keep] = 0.0
    return cleaned


def file_rng(seed: int, relative: Path) -> np.random.Generator:
    """The generator of one file: depends on the seed and the file's path only."""
    return np.random.default_rng([seed, zlib.crc32(relative.as_posix().encode())])


def process_file(raw_root: Path, out_root: Path, relative: Path, config: BackgroundRemovalConfig, seed: int,
                 pad_rgb_gt: bool) -> None:
    """Clean one xyz file (``relative`` to the roots) and copy or pad its rgb and gt partners."""
    xyz_path = raw_root / relative
    cleaned = remove_background(read_xyz(xyz_path), config, file_rng(seed, relative))
    target = out_root / relative
    with atomic_path(target) as tmp:
        tifffile.imwrite(tmp, cleaned.astype(np.float32), photometric="rgb")
    sample_dir, stem = relative.parent.parent, relative.stem
    for kind in ("rgb", "gt"):
        for source in sorted((raw_root / sample_dir / kind).glob(f"{stem}.*")):
            destination = out_root / sample_dir / kind / source.name
            if pad_rgb_gt:
                image = read_rgb(source) if kind == "rgb" else np.asarray(Image.open(source).convert("L"))
                with atomic_path(destination) as tmp:
                    Image.fromarray(pad_to_multiple(image, config.pad_multiple)).save(tmp, format="PNG")
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)


def _check_roots(raw_root: Path, out_root: Path, marker: dict) -> None:
    if not raw_root.is_dir():
        raise DatasetError(f"{raw_root}: dataset folder not found")
    if (raw_root / PREPROCESSED_MARKER).is_file():
        raise DatasetError(f"{raw_root} is already background-removed ({PREPROCESSED_MARKER} found); "
                           "point this tool at the raw MVTec 3D-AD folder")
    raw, out = raw_root.resolve(), out_root.resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise DatasetError(f"--out {out_root} must be outside {raw_root} (the raw data is never modified)")
    if out_root.exists() and any(out_root.iterdir()):
        existing = out_root / PREPROCESSED_MARKER
        previous = json.loads(existing.read_text()) if existing.is_file() else None
        if previous is None or {k: previous.get(k) for k in ("source", "parameters")} != {
            k: marker[k] for k in ("source", "parameters")
        }:
            raise DatasetError(f"{out_root} is not empty and holds no output of this run's source and parameters; "
                               "choose an empty --out folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_root", type=Path, help="the extracted MVTec 3D-AD folder (never modified)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, a new one")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad_rgb_gt", action="store_true",
                        help="zero-pad rgb and gt like the cloud (aligns them for non-square images)")
    args = parser.parse_args(argv)
    setup_logging()
    config = BackgroundRemovalConfig()
    marker = {"tool": "processing/preprocess_mvtec.py", "version": VERSION, "source": str(args.raw_root.resolve()),
              "parameters": {**asdict(config), "seed": args.seed, "pad_rgb_gt": args.pad_rgb_gt}}
    try:
        _check_roots(args.raw_root, args.out, marker)
    except DatasetError as err:
        logger.error("%s", err)
        return 2
    files = sorted(p.relative_to(args.raw_root) for p in args.raw_root.glob("*/*/*/xyz/*.tif*"))
    if not files:
        logger.error("%s: no xyz files in the MVTec 3D-AD layout (<class>/<split>/<defect>/xyz/*.tiff)", args.raw_root)
        return 2
    failures: dict[str, str] = {}
    jobs = [(args.raw_root, args.out, relative, config, args.seed, args.pad_rgb_gt) for relative in files]
    progress = tqdm(total=len(jobs), desc="background removal", unit="file")
    if args.workers <= 1:
        for job in jobs:
            try:
                process_file(*job)
            except Exception as err:  # report the file and go on with the others
                failures[str(job[2])] = f"{type(err).__name__}: {err}"
            progress.update()
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = {pool.submit(process_file, *job): job[2] for job in jobs}
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as err:  # report the file and go on with the others
                    failures[str(futures[future])] = f"{type(err).__name__}: {err}"
                progress.update()
    progress.close()
    marker.update(files=len(files), failed=dict(sorted(failures.items())))
    write_text_atomic(args.out / PREPROCESSED_MARKER, json.dumps(marker, indent=2) + "\n")
    for path, reason in sorted(failures.items()):
        logger.error("%s: %s", args.raw_root / path, reason)
    logger.info("%d of %d clouds cleaned into %s", len(files) - len(failures), len(files), args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
