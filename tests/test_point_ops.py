"""Point operations against naive float64 computations written from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from networks.extractors import point_ops
from networks.extractors.point_ops import (
    PROPAGATION_EPS, farthest_point_sample, knn, points_to_pixel_map, propagate, three_nn_weights,
)


def cloud(n: int, seed: int = 0, offset: float = 0.5, spread: float = 0.01) -> torch.Tensor:
    """Float32 points ~``offset`` metres from the origin within ``spread`` metres, like an MVTec cloud."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.random((n, 3)) * spread + np.array([0.02, -0.03, offset])).astype(np.float32))


def naive_fps(points: np.ndarray, n: int) -> list[int]:
    points = points.astype(np.float64)
    selected, min_dist = [0], [math.inf] * len(points)
    for _ in range(n - 1):
        last = points[selected[-1]]
        for j, p in enumerate(points):
            min_dist[j] = min(min_dist[j], float(((p - last) ** 2).sum()))
        selected.append(int(np.argmax(min_dist)))
    return selected


def naive_knn(queries: np.ndarray, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q, p = queries.astype(np.float64), points.astype(np.float64)
    d2 = np.array([[((qi - pj) ** 2).sum() for pj in p] for qi in q])
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, idx, axis=1), idx


def test_fps_matches_naive_loop():
    points = cloud(300)
    expected = naive_fps(points.numpy(), 40)
    assert farthest_point_sample(points, 40).tolist() == expected
    assert point_ops._fps_torch(points, 40).tolist() == expected  # the GPU path without pointnet2_ops


def test_fps_starts_at_index_zero_and_rejects_too_many():
    points = cloud(10)
    assert farthest_point_sample(points, 1).tolist() == [0]
    with pytest.raises(ValueError, match="cannot sample 11 of 10"):
        farthest_point_sample(points, 11)


@pytest.mark.parametrize("search", [point_ops._knn_kdtree, point_ops._knn_bruteforce])
def test_knn_matches_float64_brute_force(search, monkeypatch: pytest.MonkeyPatch):
    points, queries = cloud(400, seed=1), cloud(30, seed=2)
    monkeypatch.setattr(point_ops, "_CHUNK_ELEMENTS", 400 * 7)  # several chunks for the brute-force path
    expected_d2, expected_idx = naive_knn(queries.numpy(), points.numpy(), 16)
    idx = search(queries, points, 16)
    d2, idx = point_ops._canonical_order(
        ((points.double()[idx] - queries.double()[:, None]) ** 2).sum(-1), idx
    )
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(d2.numpy(), expected_d2, rtol=1e-15, atol=0)


def test_knn_public_function_sorted_and_exact():
    points, queries = cloud(500, seed=3), cloud(20, seed=4)
    d2, idx = knn(queries, points, 8)
    expected_d2, expected_idx = naive_knn(queries.numpy(), points.numpy(), 8)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(d2.numpy(), expected_d2, rtol=1e-15, atol=0)
    assert d2.dtype == torch.float64 and idx.dtype == torch.int64


def test_knn_orders_equal_distances_by_index():
    points = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0], [0, 0, 5.0]])
    _, idx = knn(torch.zeros(1, 3), points, 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_expansion_formula_would_pick_other_neighbours():
    """Why the sum of squared differences matters: at 0.5 m the |a|²+|b|²−2ab expansion in float32 errs."""
    points, queries = cloud(2000, seed=5, spread=0.002), cloud(50, seed=6, spread=0.002)
    _, exact = knn(queries, points, 32)
    expansion = (queries**2).sum(1, keepdim=True) + (points**2).sum(1) - 2 * queries @ points.T
    approx = torch.topk(expansion, 32, dim=1, largest=False).indices.sort(dim=1).values
    assert not torch.equal(approx, exact.sort(dim=1).values)


def test_three_nn_weights_match_per_point_loop():
    points, centres = cloud(200, seed=7), cloud(25, seed=8)
    idx, weights = three_nn_weights(points, centres)
    for i, p in enumerate(points.double().numpy()):
        d2 = ((centres.double().numpy() - p) ** 2).sum(1)
        nearest = np.argsort(d2, kind="stable")[:3]
        inverse = 1.0 / (d2[nearest] + PROPAGATION_EPS)
        assert idx[i].tolist() == nearest.tolist()
        np.testing.assert_allclose(weights[i].numpy(), inverse / inverse.sum(), rtol=1e-6)


def test_propagate_matches_loop():
    rng = np.random.default_rng(9)
    features = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    idx = torch.from_numpy(rng.integers(0, 6, (10, 3)))
    weights = torch.from_numpy(rng.random((10, 3)).astype(np.float32))
    expected = np.zeros((10, 5))
    for i in range(10):
        for j in range(3):
            expected[i] += weights[i, j].item() * features[idx[i, j]].double().numpy()
    np.testing.assert_allclose(propagate(features, idx, weights).numpy(), expected, rtol=1e-5, atol=1e-6)


def naive_pixel_map(features: np.ndarray, pixels: np.ndarray, size: int, out_size: int | None = None) -> np.ndarray:
    out_size = size if out_size is None else out_size
    channels = features.shape[1]
    canvas = np.zeros((channels, size, size))
    for f, p in zip(features, pixels):
        canvas[:, p // size, p % size] = f
    pooled = np.zeros((channels, size - 2, size - 2))
    for y in range(size - 2):  # 3×3 mean, no padding
        for x in range(size - 2):
            pooled[:, y, x] = canvas[:, y : y + 3, x : x + 3].mean(axis=(1, 2))
    out = np.zeros((channels, out_size, out_size))
    n_in = size - 2
    for y in range(out_size):  # adaptive average pooling: bin [floor(i·in/out), ceil((i+1)·in/out))
        for x in range(out_size):
            y0, y1 = (y * n_in) // out_size, -((-(y + 1) * n_in) // out_size)
            x0, x1 = (x * n_in) // out_size, -((-(x + 1) * n_in) // out_size)
            out[:, y, x] = pooled[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out.reshape(channels, -1).T


def test_points_to_pixel_map_matches_naive_pooling():
    rng = np.random.default_rng(10)
    size = 11
    pixels = rng.choice(size * size, 60, replace=False)
    features = rng.normal(size=(60, 4)).astype(np.float32)
    actual = points_to_pixel_map(torch.from_numpy(features), torch.from_numpy(pixels), size)
    assert actual.shape == (size * size, 4)
    np.testing.assert_allclose(actual.numpy(), naive_pixel_map(features, pixels, size), rtol=1e-5, atol=1e-6)


def propagation_case(seed: int, size: int = 13, n_points: int = 150, n_centres: int = 9, first_pixels: int = 169):
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.normal(size=(n_centres, 5)).astype(np.float32))
    indices = torch.from_numpy(rng.integers(0, n_centres, (n_points, 3)))  # repeats included
    weights = torch.from_numpy(rng.dirichlet(np.ones(3), n_points).astype(np.float32))
    pixels = torch.from_numpy(rng.choice(first_pixels, n_points, replace=False))
    return features, indices, weights, pixels


@pytest.mark.parametrize("chunk", [7, 60, 512])
def test_propagated_canvas_map_is_propagation_then_scatter_bit_for_bit(chunk: int):
    """The CUDA path: propagating blocks of points straight into the canvas changes no bit of the pooled map."""
    features, indices, weights, pixels = propagation_case(11)
    expected = points_to_pixel_map(propagate(features, indices, weights), pixels, 13, 6)
    actual = point_ops._propagated_canvas_map(features, indices, weights, pixels, 13, 6, chunk=chunk)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize(("out_size", "block_rows", "blocks_per_product"),
                         [(13, 32, 64), (6, 32, 64), (13, 5, 3), (6, 4, 2), (13, 1, 1000)])
def test_propagated_pixel_map_matches_float64_propagation_and_pooling(monkeypatch, out_size, block_rows,
                                                                      blocks_per_product):
    """The sparse-product path: the propagation written as a float64 loop, then the naive poolings; every block
    size, a last partial block (13² = 169 rows), several products per map, and pixels without points left at 0."""
    monkeypatch.setattr(point_ops, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(point_ops, "_BLOCKS_PER_PRODUCT", blocks_per_product)
    features, indices, weights, pixels = propagation_case(12, n_points=60, first_pixels=100)  # rows 8–12 empty
    point_features = np.zeros((60, 5))
    for i in range(60):
        for j in range(3):
            point_features[i] += float(weights[i, j]) * features[indices[i, j]].double().numpy()
    expected = naive_pixel_map(point_features, pixels.numpy(), 13, out_size)
    out = torch.full((out_size**2, 5), float("nan"))
    actual = point_ops.propagated_pixel_map(features, indices, weights, pixels, 13, out_size, out=out)
    assert actual is out
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(actual == 0, torch.from_numpy(expected == 0)), "exact zeros where no point reaches"
    assert (expected == 0).any() and (expected != 0).any()


def _cuda_with(module: str) -> bool:
    return torch.cuda.is_available() and point_ops._cuda_extension(module) is not None


@pytest.mark.skipif(not _cuda_with("pointnet2_ops.pointnet2_utils"), reason="needs CUDA and pointnet2_ops")
def test_pointnet2_ops_fps_agrees():
    points = cloud(5000, seed=11, spread=0.05)
    ours = point_ops._fps_torch(points.cuda(), 256).cpu()
    theirs = farthest_point_sample(points.cuda(), 256).cpu()
    assert (ours == theirs).float().mean() > 0.99  # float32 vs float64: near-ties may differ


@pytest.mark.skipif(not _cuda_with("knn_cuda"), reason="needs CUDA and knn_cuda")
def test_knn_cuda_agrees():
    points, centres = cloud(5000, seed=12, spread=0.05).cuda(), cloud(64, seed=13, spread=0.05).cuda()
    ours = knn(centres, points, 32)[1].sort(dim=1).values.cpu()
    theirs = point_ops.knn_groups(points, centres, 32).sort(dim=1).values.cpu()
    assert (ours == theirs).float().mean() > 0.99
