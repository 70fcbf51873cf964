"""FPFH (networks/extractors/fpfh.py) against a plain per-point loop written from the definitions, and its invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from networks.extractors.fpfh import FPFHConfig, compute_fpfh
from networks.features import MultimodalFeatures


def bumpy_patch(n_side: int = 18, seed: int = 0) -> np.ndarray:
    """A noisy, curved surface patch 0.5 m in front of the sensor, with a few points removed."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(-0.01, 0.01, n_side), np.linspace(-0.01, 0.01, n_side))
    z = 0.5 + 0.002 * np.sin(u * 400) * np.cos(v * 300) + rng.normal(0, 2e-5, u.shape)
    points = np.stack([u.ravel(), v.ravel(), z.ravel()], axis=1)
    return points[rng.permutation(len(points))[: len(points) - 7]]


def _sub(a, b):
    return [a[0] - b[0], a[1] - b[1], a[2] - b[2]]


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _norm(a):
    return math.sqrt(_dot(a, a))


def loop_neighbours(points, i, radius, max_nn):
    """The max_nn nearest points within radius (itself included), by (distance, index)."""
    found = sorted((_norm(_sub(q, points[i])), j) for j, q in enumerate(points))
    return [(d, j) for d, j in found if d <= radius][:max_nn]


def loop_normal(points, neighbours, p, sensor):
    if len(neighbours) < 3:
        n = _sub(sensor, p)
        length = _norm(n)
        return [c / length for c in n]
    block = np.array([points[j] for _, j in neighbours])
    centred = block - block.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred / len(block))
    n = list(vectors[:, 0])
    return n if _dot(n, _sub(sensor, p)) >= 0 else [-c for c in n]


def loop_pair(p1, n1, p2, n2):
    """Open3D's ComputePairFeatures, line by line: (theta, alpha, phi)."""
    d = _sub(p2, p1)
    length = _norm(d)
    if length == 0:
        return 0.0, 0.0, 0.0
    a1, a2 = _dot(n1, d) / length, _dot(n2, d) / length
    if math.acos(abs(a1)) > math.acos(abs(a2)):
        n1, n2, d, phi = n2, n1, [-c for c in d], -a2
    else:
        phi = a1
    v = _cross(d, n1)
    v_len = _norm(v)
    if v_len == 0:
        return 0.0, 0.0, 0.0
    v = [c / v_len for c in v]
    w = _cross(n1, v)
    return math.atan2(_dot(w, n2), _dot(n1, n2)), _dot(v, n2), phi


def loop_fpfh(points: np.ndarray, config: FPFHConfig) -> np.ndarray:
    pts = [list(map(float, p)) for p in points]
    spacing = float(np.median([sorted(_norm(_sub(q, p)) for q in pts)[1] for p in pts]))
    normals = [loop_normal(pts, loop_neighbours(pts, i, config.normal_radius * spacing, config.normal_max_nn),
                           pts[i], list(config.sensor)) for i in range(len(pts))]
    neighbourhoods = []
    spfh = np.zeros((len(pts), 33))
    for i in range(len(pts)):
        others = [(d, j) for d, j in loop_neighbours(pts, i, config.feature_radius * spacing, config.feature_max_nn)
                  if j != i]
        neighbourhoods.append(others)
        for _, j in others:
            theta, alpha, phi = loop_pair(pts[i], normals[i], pts[j], normals[j])
            bins = (math.floor(11 * (theta + math.pi) / (2 * math.pi)), math.floor(11 * (alpha + 1) * 0.5),
                    math.floor(11 * (phi + 1) * 0.5))
            for group, b in enumerate(bins):
                spfh[i, 11 * group + min(max(b, 0), 10)] += 100.0 / len(others)
    fpfh = np.zeros_like(spfh)
    for i, others in enumerate(neighbourhoods):
        sums = [0.0, 0.0, 0.0]
        for d, j in others:
            if d == 0:
                continue
            for k in range(33):
                value = spfh[j, k] / d**2
                sums[k // 11] += value
                fpfh[i, k] += value
        for k in range(33):
            fpfh[i, k] = fpfh[i, k] * (100.0 / sums[k // 11] if sums[k // 11] else 0.0) + spfh[i, k]
    return fpfh


@pytest.mark.parametrize("config", [
    FPFHConfig(),
    FPFHConfig(normal_radius=2.5, normal_max_nn=10, feature_radius=3.0, feature_max_nn=25),
    # normal neighbourhoods larger than the histograms': searched on their own, not read from the others
    FPFHConfig(normal_radius=4.0, normal_max_nn=30, feature_radius=3.0, feature_max_nn=20),
], ids=["default", "small", "normals_wider"])
def test_fpfh_equals_a_plain_per_point_loop(config: FPFHConfig):
    points = bumpy_patch()
    expected = loop_fpfh(points, config)
    actual = compute_fpfh(points, config)
    assert actual.shape == (len(points), 33)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9)
    # every point's three sub-histograms: its SPFH (100 each, unless it has no neighbour) + 100 from the others
    sums = actual.reshape(len(points), 3, 11).sum(axis=2)
    assert np.allclose(sums, 200.0)


def test_fpfh_does_not_depend_on_threads_or_blocks(monkeypatch: pytest.MonkeyPatch):
    """Rows are computed in blocks on several threads: neither changes a bit."""
    points = bumpy_patch(n_side=30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = compute_fpfh(points)
        torch.set_num_threads(max(threads, 2))
        monkeypatch.setattr("networks.extractors.fpfh._PAIRS_PER_BLOCK", 700)  # 7 rows per block (100 pairs each)
        monkeypatch.setattr("networks.extractors.fpfh._NORMAL_BLOCK", 50)
        np.testing.assert_array_equal(compute_fpfh(points), one_thread)
    finally:
        torch.set_num_threads(threads)


def test_repeated_points_count_once():
    """An upsampled cloud repeats measurements: the repeats get the features of the point they repeat."""
    points = bumpy_patch(n_side=10)
    repeats = np.concatenate([points, points[:5], points[:2]])
    features = compute_fpfh(repeats)
    np.testing.assert_array_equal(features[: len(points)], compute_fpfh(points))
    np.testing.assert_array_equal(features[len(points) :], features[[0, 1, 2, 3, 4, 0, 1]])


def test_fpfh_does_not_depend_on_the_unit_or_the_point_order():
    """Radii follow the point spacing: the same surface in millimetres gives the same features."""
    points = bumpy_patch(seed=1)
    features = compute_fpfh(points)
    np.testing.assert_allclose(compute_fpfh(points * 1000.0), features, rtol=1e-6, atol=1e-6)
    order = np.random.default_rng(0).permutation(len(points))
    np.testing.assert_allclose(compute_fpfh(points[order]), features[order], rtol=1e-9, atol=1e-9)


def test_fpfh_tells_a_bump_from_a_plane():
    """The descriptor sees local geometry: points on a bump differ from points on the flat part around it."""
    u, v = np.meshgrid(np.linspace(-0.01, 0.01, 40), np.linspace(-0.01, 0.01, 40))
    z = 0.5 - 0.001 * np.exp(-(u**2 + v**2) / (2 * 0.0015**2))  # towards the sensor
    features = compute_fpfh(np.stack([u.ravel(), v.ravel(), z.ravel()], axis=1))
    radius = np.sqrt(u**2 + v**2).ravel()
    flat = features[(radius > 0.006) & (np.abs(u).ravel() < 0.008) & (np.abs(v).ravel() < 0.008)]
    on_bump = features[(radius > 0.0012) & (radius < 0.0025)]
    spread = np.linalg.norm(flat - flat.mean(axis=0), axis=1).max()
    assert np.linalg.norm(on_bump - flat.mean(axis=0), axis=1).min() > 2 * spread


def test_a_cloud_with_too_few_points_is_an_error():
    extractor = MultimodalFeatures("lite_fpfh", modality="xyz")
    cloud = torch.zeros(1, 3, 224, 224)
    cloud[0, 0, 100, 100:110] = torch.linspace(0.01, 0.02, 10)
    cloud[0, 1:, 100, 100:110] = torch.tensor([0.02, 0.5])[:, None]
    with pytest.raises(ValueError, match=r"5 valid points on its grid_stride=2 sub-grid \(10 in all\), fewer than"):
        extractor.extract_xyz_parts(cloud)
    with pytest.raises(ValueError, match="10 valid points, fewer than the 30"):
        compute_fpfh(cloud[0, :, 100, 100:110].T.double().numpy())


def test_grid_stride_computes_on_the_sub_grid_and_copies_to_the_nearest_point():
    """grid_stride=2: FPFH of the points on even rows and columns, as a cloud of their own; every point takes the
    features of its nearest such point (found here by brute force)."""
    rng = np.random.default_rng(4)
    rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    keep = rng.random(rows.shape) > 0.1  # missing points, some on the sub-grid
    pixels = np.stack([rows[keep], cols[keep]], axis=1)
    points = np.stack([pixels[:, 1] * 1e-3, pixels[:, 0] * 1e-3,
                       0.5 + 1e-3 * np.sin(pixels[:, 0] / 4.0) + 2e-4 * rng.random(len(pixels))], axis=1)
    on_grid = (pixels[:, 0] % 2 == 0) & (pixels[:, 1] % 2 == 0)
    sub_points = points[on_grid]
    sub_features = compute_fpfh(sub_points)
    expected = np.stack([sub_features[np.argmin(((sub_points - p) ** 2).sum(axis=1))] for p in points])
    actual = compute_fpfh(points, FPFHConfig(grid_stride=2), pixels)
    np.testing.assert_array_equal(actual, expected)
    assert not np.array_equal(actual, compute_fpfh(points)), "the sub-grid's features are not the full cloud's"
    with pytest.raises(ValueError, match=r"needs the points' \(row, column\) pixels"):
        compute_fpfh(points, FPFHConfig(grid_stride=2))
    with pytest.raises(ValueError, match="grid_stride must be at least 1"):
        FPFHConfig(grid_stride=0)


def test_radius_neighbours_break_distance_ties_by_index():
    """On a regular grid most distances tie: the neighbours come sorted by distance, then index (brute force)."""
    from scipy.spatial import cKDTree

    from networks.extractors.fpfh import radius_neighbours

    u, v = np.meshgrid(np.arange(12.0), np.arange(12.0))
    points = np.stack([u.ravel(), v.ravel(), np.zeros(u.size)], axis=1)
    neighbours = radius_neighbours(cKDTree(points), points, radius=2.5, max_nn=25)  # 21 at most inside: no cut
    for i in range(len(points)):
        distance = np.linalg.norm(points - points[i], axis=1)
        inside = [j for j in np.lexsort((np.arange(len(points)), distance)) if distance[j] <= 2.5]
        assert neighbours[i].tolist() == inside + [-1] * (25 - len(inside))
