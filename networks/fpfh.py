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

Radii are in units of the cloud's own point spacing (the median distance of a point to its nearest neighbour),
so the same settings work for the synthetic scenes and for MVTec 3D-AD clouds in metres: the reference's fixed
radii (0.1 and 0.25 in the cloud's units) are larger than an MVTec object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.spatial import cKDTree
from torch import nn

BINS = 11
FPFH_DIM = 3 * BINS
_CHUNK = 8192  # points per vectorised block: bounds memory at ~chunk × max_nn pairs


@dataclass(frozen=True)
class FPFHConfig:
    """FPFH settings; radii in units of the cloud's median nearest-neighbour spacing.

    Attributes:
        normal_radius, normal_max_nn: neighbourhood of the normal estimation (the point included).
        feature_radius, feature_max_nn: neighbourhood of the histograms (the point included, as in Open3D).
        sensor: where the sensor is, in the cloud's coordinates (MVTec 3D-AD: the camera at the origin).
    """

    normal_radius: float = 4.0
    normal_max_nn: int = 30
    feature_radius: float = 8.0
    feature_max_nn: int = 100
    sensor: tuple[float, float, float] = (0.0, 0.0, 0.0)

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
    return index


def estimate_normals(points: np.ndarray, neighbours: np.ndarray, sensor: np.ndarray) -> np.ndarray:
    """PCA normals oriented towards ``sensor``.

    Args:
        points: (N, 3) float64.
        neighbours: (N, K) indices, −1 = none (see :func:`radius_neighbours`).
        sensor: (3,).

    Returns:
        (N, 3) float64 unit normals.
    """
    valid = neighbours >= 0
    count = valid.sum(axis=1)
    gathered = points[np.where(valid, neighbours, 0)]  # (N, K, 3)
    weight = valid[..., None].astype(np.float64)
    mean = (gathered * weight).sum(axis=1) / count[:, None]
    centred = (gathered - mean[:, None]) * weight
    covariance = np.einsum("nki,nkj->nij", centred, centred) / count[:, None, None]
    _, vectors = np.linalg.eigh(covariance)  # eigenvalues ascending
    normals = vectors[:, :, 0]
    to_sensor = sensor - points
    few = count < 3
    normals[few] = to_sensor[few] / np.linalg.norm(to_sensor[few], axis=1, keepdims=True)
    flip = np.einsum("ni,ni->n", normals, to_sensor) < 0
    normals[flip] *= -1.0
    return normals


def pair_features(p1: np.ndarray, n1: np.ndarray, p2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """The Darboux-frame triplet (θ, α, φ) of point pairs, as Open3D's ``ComputePairFeatures``: (M, 3) float64.

    Args:
        p1, n1, p2, n2: (M, 3) points and unit normals.
    """
    delta = p2 - p1
    distance = np.linalg.norm(delta, axis=1)
    safe = np.where(distance > 0, distance, 1.0)
    angle1 = np.einsum("mi,mi->m", n1, delta) / safe
    angle2 = np.einsum("mi,mi->m", n2, delta) / safe
    swap = np.arccos(np.abs(angle1)) > np.arccos(np.abs(angle2))
    source = np.where(swap[:, None], n2, n1)
    target = np.where(swap[:, None], n1, n2)
    delta = np.where(swap[:, None], -delta, delta)
    phi = np.where(swap, -angle2, angle1)
    v = np.cross(delta, source)
    v_norm = np.linalg.norm(v, axis=1)
    v = v / np.where(v_norm > 0, v_norm, 1.0)[:, None]
    w = np.cross(source, v)
    alpha = np.einsum("mi,mi->m", v, target)
    theta = np.arctan2(np.einsum("mi,mi->m", w, target), np.einsum("mi,mi->m", source, target))
    features = np.stack([theta, alpha, phi], axis=1)
    features[(distance == 0) | (v_norm == 0)] = 0.0
    return features


def histogram_bins(features: np.ndarray) -> np.ndarray:
    """Bin of each triplet in the 33-bin layout: (M, 3) → (M, 3) int in [0, 11), [11, 22), [22, 33)."""
    theta = np.floor(BINS * (features[:, 0] + np.pi) / (2.0 * np.pi))
    alpha = np.floor(BINS * (features[:, 1] + 1.0) * 0.5)
    phi = np.floor(BINS * (features[:, 2] + 1.0) * 0.5)
    bins = np.clip(np.stack([theta, alpha, phi], axis=1), 0, BINS - 1).astype(np.int64)
    return bins + np.array([0, BINS, 2 * BINS])


def _pairs(neighbours: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(source point, neighbour) index pairs of points start..stop, the point itself excluded."""
    block = neighbours[start:stop]
    rows = np.arange(start, stop)[:, None]
    keep = (block >= 0) & (block != rows)
    return np.broadcast_to(rows, block.shape)[keep], block[keep]


def compute_spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Simplified point feature histograms: (N, 33) float64."""
    n_points = len(points)
    spfh = np.zeros(n_points * FPFH_DIM)
    for start in range(0, n_points, _CHUNK):
        source, target = _pairs(neighbours, start, min(start + _CHUNK, n_points))
        features = pair_features(points[source], normals[source], points[target], normals[target])
        count = np.bincount(source - start, minlength=min(_CHUNK, n_points - start))
        increment = 100.0 / np.maximum(count[source - start], 1)
        flat = source[:, None] * FPFH_DIM + histogram_bins(features)
        spfh += np.bincount(flat.ravel(), weights=np.repeat(increment, 3), minlength=n_points * FPFH_DIM)
    return spfh.reshape(n_points, FPFH_DIM)


def compute_fpfh(points: np.ndarray, config: FPFHConfig = FPFHConfig()) -> np.ndarray:
    """FPFH of every point of a cloud.

    Repeated points (a cloud resized up from a smaller image repeats each measurement) count once: the features
    are computed on the distinct points and copied to their repeats.

    Args:
        points: (N, 3) coordinates (any unit), at least ``config.min_points`` distinct.

    Returns:
        (N, 33) float64.
    """
    points, inverse = np.unique(np.asarray(points, dtype=np.float64), axis=0, return_inverse=True)
    if len(points) < config.min_points:
        raise ValueError(f"point cloud has {len(points)} valid points, fewer than the {config.min_points} that "
                         f"FPFH normals (normal_max_nn={config.normal_max_nn}) need")
    return _fpfh_of_distinct_points(points, config)[inverse.reshape(-1)]


def _fpfh_of_distinct_points(points: np.ndarray, config: FPFHConfig) -> np.ndarray:
    tree = cKDTree(points)
    spacing = point_spacing(points, tree)
    normal_nn = radius_neighbours(tree, points, config.normal_radius * spacing, config.normal_max_nn)
    normals = estimate_normals(points, normal_nn, np.asarray(config.sensor, dtype=np.float64))
    neighbours = radius_neighbours(tree, points, config.feature_radius * spacing, config.feature_max_nn)
    spfh = compute_spfh(points, normals, neighbours)

    # Σ_q spfh(q) / ‖p − q‖² as a sparse (N × N) weight matrix times the (N, 33) SPFHs.
    source, target = _pairs(neighbours, 0, len(points))
    d2 = ((points[target] - points[source]) ** 2).sum(axis=1)
    keep = d2 > 0
    weights = sparse.csr_matrix((1.0 / d2[keep], (source[keep], target[keep])), shape=(len(points), len(points)))
    weighted = weights @ spfh
    group_sums = weighted.reshape(len(points), 3, BINS).sum(axis=2)
    scale = np.where(group_sums != 0, 100.0 / np.where(group_sums != 0, group_sums, 1.0), 0.0)
    return weighted * np.repeat(scale, BINS, axis=1) + spfh


class FPFHExtractor(nn.Module):
    """FPFH as a frozen "backbone" (no parameters): (N, 3) valid points → (N, 33) float32 features."""

    def __init__(self, config: FPFHConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        features = compute_fpfh(points.detach().cpu().double().numpy(), self.config)
        return torch.from_numpy(features).to(device=points.device, dtype=torch.float32)
