"""Fast Point Feature Histograms (Rusu, Blodow and Beetz, ICRA 2009): the 3D features of the ``lite`` preset.

FPFH needs no weights and describes the local surface shape around each point with 33 numbers, which is what
"Back to the Feature" (Horwitz and Hoshen, CVPR 2023) uses as its 3D features. Computed here in numpy/scipy
(float64, KD-tree), following the definitions as Open3D implements them (BTF's reference calls Open3D):

1. **Normals**: the eigenvector of the smallest eigenvalue of the covariance of each point's neighbours (the
   ``normal_max_nn`` nearest within ``normal_radius``, the point included), oriented towards the sensor
   (``n · (sensor − p) ≥ 0``). With fewer than 3 neighbours the normal is the unit vector towards the sensor.
2. **SPFH** of a point p: for each neighbour q (the ``feature_max_nn`` nearest within ``feature_radius``, p
   excluded) the Darboux-frame triplet (α, φ, θ) of the pair; the source of the frame is the point whose normal
   makes the smaller angle with the line between them. Three 11-bin histograms (θ over [−π, π], α and φ over
   [−1, 1]), each neighbour adding 100 / (number of neighbours). A pair at distance 0, or whose frame is
   degenerate, contributes (0, 0, 0), i.e. the middle bins, as in Open3D.
3. **FPFH**(p) = SPFH(p) + the neighbours' SPFHs weighted by 1 / ‖p − q‖², each 11-bin group of that weighted sum
   rescaled to sum to 100 (Open3D weights by the squared distance its KD-tree returns).

The work is vectorised over blocks of points, the blocks spread over ``torch.get_num_threads()`` threads; each
point's values are computed on their own, so neither the blocks nor the threads change a bit.

Radii are in units of the cloud's own point spacing (the median distance of a point to its nearest neighbour),
so the same settings work for the synthetic scenes and for MVTec 3D-AD clouds in metres: the reference's fixed
radii (0.1 and 0.25 in the cloud's units) are larger than an MVTec object.

With ``grid_stride`` s > 1 (the ``lite`` preset: 2) the histograms are computed on the points of every s-th row
and column of the organised cloud only — exactly as above, on that sub-cloud, whose spacing is s times larger —
and every other point takes the features of its nearest computed point. The lite modules see a 56 × 56 grid:
at 224² full resolution spends 16 FPFH values per grid cell, s = 2 spends 4, a quarter of the work, and each
neighbourhood spans twice the distance (docs/presets.md has the measurements).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse
from scipy.spatial import cKDTree
from torch import nn

BINS = 11
FPFH_DIM = 3 * BINS
# Bump when a change here alters feature values (it is in the feature cache's key). 2: dot products summed
# x, y, z in order, covariances by matmul, a histogram as counts × 100 / n, the frame's source chosen by |cos|
# without acos (values move by float rounding; pairs tied to rounding level may change bins).
FPFH_VERSION = 2
# Work is split in row blocks, one per thread at a time. Pair blocks this size stay in the CPU caches (measured:
# 256 points × 100 pairs ran 1.4× faster than 2048 × 100); the normals' eigen-solves prefer larger blocks.
_PAIRS_PER_BLOCK = 32768
_NORMAL_BLOCK = 2048


@dataclass(frozen=True)
class FPFHConfig:
    """FPFH settings; radii in units of the cloud's median nearest-neighbour spacing.

    Attributes:
        normal_radius, normal_max_nn: neighbourhood of the normal estimation (the point included).
        feature_radius, feature_max_nn: neighbourhood of the histograms (the point included, as in Open3D).
        sensor: where the sensor is, in the cloud's coordinates (MVTec 3D-AD: the camera at the origin).
        grid_stride: compute on every ``grid_stride``-th row and column of the organised cloud; the other points
            take the features of their nearest computed point (1: every point).
    """

    normal_radius: float = 4.0
    normal_max_nn: int = 30
    feature_radius: float = 8.0
    feature_max_nn: int = 100
    sensor: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grid_stride: int = 1

    def __post_init__(self) -> None:
        if self.grid_stride < 1:
            raise ValueError(f"grid_stride must be at least 1, got {self.grid_stride}")

    @property
    def feature_dim(self) -> int:
        return FPFH_DIM

    @property
    def min_points(self) -> int:
        """Fewest valid points a cloud must have (one normal neighbourhood)."""
        return self.normal_max_nn


def point_spacing(points: np.ndarray, tree: cKDTree | None = None) -> float:
    """Median distance of a point to its nearest other point."""
    tree = cKDTree(points) if tree is None else tree
    distances, _ = tree.query(points, k=2, workers=-1)
    return float(np.median(distances[:, 1]))


def radius_neighbours(tree: cKDTree, points: np.ndarray, radius: float, max_nn: int) -> np.ndarray:
    """The ``max_nn`` nearest points within ``radius`` of each point (itself included): (N, max_nn), −1 = none.

    Ties in distance are broken by index, so the order does not depend on the KD-tree's traversal (which of
    several points tied at the ``max_nn``-th place is kept does: scipy's choice).
    """
    return _nearest_within(tree, points, radius, max_nn)[1]


def _nearest_within(tree: cKDTree, points: np.ndarray, radius: float, max_nn: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`radius_neighbours` and their distances: (N, max_nn) each, −1 and +∞ past the last neighbour."""
    k = min(max_nn, len(points))
    distances, index = tree.query(points, k=k, distance_upper_bound=radius, workers=-1)
    index = np.where(np.isfinite(distances), index, -1)
    # Canonical order: distance, then index (scipy's order among equal distances is unspecified). scipy returns
    # the rows sorted by distance, so only rows with equal distances need sorting.
    with np.errstate(invalid="ignore"):  # inf − inf past the last neighbour: not a tie
        tied = np.flatnonzero((np.diff(distances, axis=1) == 0).any(axis=1))
    if tied.size:
        rows = index[tied]
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), distances[tied]), axis=-1)
        index[tied] = np.take_along_axis(rows, order, axis=-1)
    if k < max_nn:
        index = np.pad(index, ((0, 0), (0, max_nn - k)), constant_values=-1)
        distances = np.pad(distances, ((0, 0), (0, max_nn - k)), constant_values=np.inf)
    return distances, index


def _normal_neighbours(tree: cKDTree, points: np.ndarray, spacing: float, config: FPFHConfig,
                       feature_distances: np.ndarray, feature_neighbours: np.ndarray) -> np.ndarray:
    """The normals' neighbourhoods. When they are smaller than the histograms' (the defaults), they are a prefix
    of those (both sorted by distance, then index): read from it instead of searching the tree again."""
    radius = config.normal_radius * spacing
    if config.normal_radius > config.feature_radius or config.normal_max_nn > config.feature_max_nn:
        return radius_neighbours(tree, points, radius, config.normal_max_nn)
    head = slice(0, config.normal_max_nn)
    return np.where(feature_distances[:, head] < radius, feature_neighbours[:, head], -1)  # scipy's bound is strict


def estimate_normals(points: np.ndarray, neighbours: np.ndarray, sensor: np.ndarray) -> np.ndarray:
    """PCA normals oriented towards ``sensor``.

    Args:
        points: (N, 3) float64.
        neighbours: (N, K) indices, −1 = none (see :func:`radius_neighbours`).
        sensor: (3,).

    Returns:
        (N, 3) float64 unit normals.
    """
    blocks = _row_blocks(len(points), _NORMAL_BLOCK)
    return np.concatenate(_in_threads(lambda rows: _block_normals(points, neighbours, sensor, rows), blocks))


def _block_normals(points: np.ndarray, neighbours: np.ndarray, sensor: np.ndarray, rows: slice) -> np.ndarray:
    block = neighbours[rows]
    valid = block >= 0
    count = valid.sum(axis=1)
    gathered = points[np.where(valid, block, 0)]  # (n, K, 3)
    weight = valid.astype(np.float64)[:, None, :]  # (n, 1, K): sums over the neighbours as matrix products
    mean = np.matmul(weight, gathered) / count[:, None, None]  # (n, 1, 3)
    centred = gathered - mean
    if not valid.all():
        centred *= weight.transpose(0, 2, 1)
    covariance = np.matmul(centred.transpose(0, 2, 1), centred) / count[:, None, None]
    _, vectors = np.linalg.eigh(covariance)  # eigenvalues ascending
    normals = vectors[:, :, 0]
    to_sensor = sensor - points[rows]
    few = count < 3
    normals[few] = to_sensor[few] / np.linalg.norm(to_sensor[few], axis=1, keepdims=True)
    flip = np.einsum("ni,ni->n", normals, to_sensor) < 0
    normals[flip] *= -1.0
    return normals


def pair_features(points: np.ndarray, normals: np.ndarray, source: np.ndarray, target: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Darboux-frame triplet of point pairs, as Open3D's ``ComputePairFeatures``, and their squared distance.

    Written per coordinate (dot and cross products summed x, y, z in that order) on gathered columns: the
    vectorised form of the per-pair arithmetic, without (M, 3) temporaries.

    Args:
        points, normals: (3, N) float64 coordinates and unit normals, one row per axis.
        source, target: (M,) indices of the pairs' first and second points.

    Returns:
        θ, α, φ and ‖p2 − p1‖², each (M,) float64; a pair at distance 0 or with a degenerate frame has
        θ = α = φ = 0.
    """
    px, py, pz = points
    nx, ny, nz = normals
    dx, dy, dz = px[target] - px[source], py[target] - py[source], pz[target] - pz[source]
    squared = dx * dx + dy * dy + dz * dz
    distance = np.sqrt(squared)
    safe = np.where(distance > 0, distance, 1.0)
    n1x, n1y, n1z = nx[source], ny[source], nz[source]
    n2x, n2y, n2z = nx[target], ny[target], nz[target]
    angle1 = (n1x * dx + n1y * dy + n1z * dz) / safe
    angle2 = (n2x * dx + n2y * dy + n2z * dz) / safe
    # The source of the frame is the point whose normal makes the smaller angle with the line, which Open3D
    # tests as acos(|a1|) > acos(|a2|). acos decreases, so that is |a1| < |a2|, compared here without acos:
    # rounded acos values can tie (or, in numpy's vectorised acos, order differently) for two values an ulp apart.
    swap = np.abs(angle1) < np.abs(angle2)
    sx, sy, sz = np.where(swap, n2x, n1x), np.where(swap, n2y, n1y), np.where(swap, n2z, n1z)
    tx, ty, tz = np.where(swap, n1x, n2x), np.where(swap, n1y, n2y), np.where(swap, n1z, n2z)
    sign = np.where(swap, -1.0, 1.0)  # a product by ±1 is exact: the swapped line is −delta, bit for bit
    dx, dy, dz = dx * sign, dy * sign, dz * sign
    phi = np.where(swap, -angle2, angle1)
    vx, vy, vz = dy * sz - dz * sy, dz * sx - dx * sz, dx * sy - dy * sx
    v_norm = np.sqrt(vx * vx + vy * vy + vz * vz)
    safe = np.where(v_norm > 0, v_norm, 1.0)
    vx, vy, vz = vx / safe, vy / safe, vz / safe
    wx, wy, wz = sy * vz - sz * vy, sz * vx - sx * vz, sx * vy - sy * vx
    alpha = vx * tx + vy * ty + vz * tz
    theta = np.arctan2(wx * tx + wy * ty + wz * tz, sx * tx + sy * ty + sz * tz)
    degenerate = (distance == 0) | (v_norm == 0)
    for feature in (theta, alpha, phi):
        feature[degenerate] = 0.0
    return theta, alpha, phi, squared


def histogram_bins(theta: np.ndarray, alpha: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Bin of each triplet in the 33-bin layout: three (M,) arrays → (3, M) int, rows in [0, 11), [11, 22),
    [22, 33)."""
    bins = np.empty((3, len(theta)), dtype=np.int64)
    for group, value in enumerate((BINS * (theta + np.pi) / (2.0 * np.pi), BINS * (alpha + 1.0) * 0.5,
                                   BINS * (phi + 1.0) * 0.5)):
        bins[group] = np.clip(np.floor(value), 0, BINS - 1) + group * BINS
    return bins


@dataclass
class _PairBlock:
    """The pairs of a block of consecutive points (sources in row order, each point's neighbours in order)."""

    rows: slice
    source: np.ndarray  # (M,) row within the block
    target: np.ndarray  # (M,) neighbour's index in the cloud
    count: np.ndarray  # (rows,) pairs per point
    squared: np.ndarray | None = None  # (M,) squared distances, set by the SPFH pass


def _pair_block(neighbours: np.ndarray, rows: slice) -> _PairBlock:
    """(point, neighbour) pairs of the points ``rows``, the point itself excluded."""
    block = neighbours[rows]
    local = np.arange(rows.stop - rows.start)[:, None]
    keep = (block >= 0) & (block != local + rows.start)
    return _PairBlock(rows, np.broadcast_to(local, block.shape)[keep], block[keep], keep.sum(axis=1))


def _block_spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray, rows: slice
                ) -> tuple[np.ndarray, _PairBlock]:
    """SPFH of the points ``rows``: (rows, 33), and their pairs."""
    pairs = _pair_block(neighbours, rows)
    theta, alpha, phi, pairs.squared = pair_features(points, normals, pairs.source + pairs.rows.start, pairs.target)
    n_rows = len(pairs.count)
    flat = (pairs.source * FPFH_DIM + histogram_bins(theta, alpha, phi)).ravel()
    counts = np.bincount(flat, minlength=n_rows * FPFH_DIM).reshape(n_rows, FPFH_DIM)
    return counts * (100.0 / np.maximum(pairs.count, 1))[:, None], pairs  # each pair adds 100 / (pairs of p)


def _block_fpfh(spfh: np.ndarray, pairs: _PairBlock) -> np.ndarray:
    """FPFH of the points of a block from every point's SPFH: (rows, 33).

    Σ_q spfh(q) / ‖p − q‖² is a sparse (rows × N) weight matrix, each row in neighbour order, times the SPFHs;
    each 11-bin group of it is rescaled to sum to 100 and the point's own SPFH added.
    """
    n_rows = len(pairs.count)
    keep = pairs.squared > 0
    row_starts = np.concatenate([[0], np.cumsum(np.bincount(pairs.source[keep], minlength=n_rows))])
    weights = sparse.csr_matrix((1.0 / pairs.squared[keep], pairs.target[keep], row_starts),
                                shape=(n_rows, len(spfh)))
    weighted = weights @ spfh
    group_sums = weighted.reshape(n_rows, 3, BINS).sum(axis=2)
    scale = np.where(group_sums != 0, 100.0 / np.where(group_sums != 0, group_sums, 1.0), 0.0)
    return weighted * np.repeat(scale, BINS, axis=1) + spfh[pairs.rows]


def _row_blocks(n_rows: int, block_rows: int) -> list[slice]:
    return [slice(start, min(start + block_rows, n_rows)) for start in range(0, n_rows, block_rows)]


def _in_threads(function: Callable[[Any], Any], items: list) -> list:
    """``[function(item) for item in items]`` in ``torch.get_num_threads()`` threads (numpy releases the GIL in
    its loops). Each item is a block of rows computed on its own, so the values depend neither on the blocks nor
    on the threads."""
    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        return [function(item) for item in items]
    return list(_thread_pool(workers, os.getpid()).map(function, items))


@functools.lru_cache(maxsize=1)
def _thread_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool kept per process (starting threads for every cloud cost ≈7 ms of ≈120); keyed by the process id
    because a forked child inherits the pool but not its threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="fpfh")


def distinct_rows(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(points, axis=0, return_inverse=True)`` (rows in lexicographic order), by a lexsort on the
    columns, which is twice as fast as numpy's sort of whole rows."""
    order = np.lexsort(points.T[::-1])
    ordered = points[order]
    first = np.ones(len(points), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(points), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def compute_fpfh(points: np.ndarray, config: FPFHConfig = FPFHConfig(), pixels: np.ndarray | None = None
                 ) -> np.ndarray:
    """FPFH of every point of a cloud.

    Repeated points (a cloud resized up from a smaller image repeats each measurement) count once: the features
    are computed on the distinct points and copied to their repeats.

    Args:
        points: (N, 3) coordinates (any unit), at least ``config.min_points`` distinct (of the sub-cloud that
            ``config.grid_stride`` selects).
        pixels: (N, 2) integer (row, column) of each point in its organised cloud; needed when
            ``config.grid_stride`` > 1.

    Returns:
        (N, 33) float64.
    """
    points = np.asarray(points, dtype=np.float64)
    if config.grid_stride == 1:
        return _fpfh_of_points(points, config, "")
    if pixels is None:
        raise ValueError(f"FPFH with grid_stride={config.grid_stride} needs the points' (row, column) pixels")
    on_grid = np.all(np.asarray(pixels) % config.grid_stride == 0, axis=1)
    computed = points[on_grid]
    features = _fpfh_of_points(computed, config, f" on its grid_stride={config.grid_stride} sub-grid "
                                                 f"({len(points)} in all)")
    _, nearest = cKDTree(computed).query(points, k=1, workers=-1)
    return features[nearest]


def _fpfh_of_points(points: np.ndarray, config: FPFHConfig, where: str) -> np.ndarray:
    points, inverse = distinct_rows(points)
    if len(points) < config.min_points:
        raise ValueError(f"point cloud has {len(points)} valid points{where}, fewer than the {config.min_points} "
                         f"that FPFH normals (normal_max_nn={config.normal_max_nn}) need")
    return _fpfh_of_distinct_points(points, config)[inverse]


def _fpfh_of_distinct_points(points: np.ndarray, config: FPFHConfig) -> np.ndarray:
    tree = cKDTree(points)
    spacing = point_spacing(points, tree)
    distances, neighbours = _nearest_within(tree, points, config.feature_radius * spacing, config.feature_max_nn)
    normal_nn = _normal_neighbours(tree, points, spacing, config, distances, neighbours)
    normals = estimate_normals(points, normal_nn, np.asarray(config.sensor, dtype=np.float64))
    columns = np.ascontiguousarray(points.T), np.ascontiguousarray(normals.T)
    rows_per_block = max(1, _PAIRS_PER_BLOCK // config.feature_max_nn)
    blocks = _in_threads(lambda rows: _block_spfh(*columns, neighbours, rows), _row_blocks(len(points), rows_per_block))
    spfh = np.concatenate([block_spfh for block_spfh, _ in blocks])
    return np.concatenate(_in_threads(lambda block: _block_fpfh(spfh, block[1]), blocks))


class FPFHExtractor(nn.Module):
    """FPFH as a frozen "backbone" (no parameters): (N, 3) valid points → (N, 33) float32 features."""

    def __init__(self, config: FPFHConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, points: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3) points and their (N, 2) (row, column) pixels (needed for ``grid_stride`` > 1) → (N, 33)."""
        features = compute_fpfh(points.detach().cpu().double().numpy(), self.config,
                                None if pixels is None else pixels.cpu().numpy())
        return torch.from_numpy(features).to(device=points.device, dtype=torch.float32)
