"""Fusion and scoring against an independent float64 numpy implementation of method.md §4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from networks.blocks.fusion import (
    FUSION_VARIANTS, confidence_weighted_reconstruction_anomaly, fuse, normalize_scores,
    reliability_gated_mapping_anomaly, single_modality_map,
)

# --- the reference formulas, written again with numpy/scipy ------------------------------------------------------


def box(x: np.ndarray, k: int, n: int) -> np.ndarray:
    for _ in range(n):  # mean over a k×k window, zeros outside the image
        x = uniform_filter(x, size=k, mode="constant", cval=0.0)
    return x


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gate(d2: np.ndarray, d3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    j = d2 * d3
    sigma = np.sqrt(box((j - j.mean()) ** 2, 7, 1))
    w = 4 + 2 * sigma / (sigma.mean() + 1e-8)
    return j, sigmoid(w * j)


def a_rec(r2: np.ndarray, r3: np.ndarray, b: float = 0.3) -> np.ndarray:
    w2, w3 = np.exp(-b * r2), np.exp(-b * r3)
    return (w2 * r2 + w3 * r3) / (w2 + w3 + 1e-8)


def soft(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ea, eb = np.exp(-a), np.exp(-b)
    return (ea * a + eb * b) / (ea + eb)


def reference_psi(m2, m3, r2, r3, valid, variant):
    r2 = box(box(r2, 5, 3), 7, 2)
    j, alpha = gate(m2, m3)
    psi = {
        "full": lambda: alpha * j * a_rec(r2, r3),
        "case1": lambda: alpha * j * (r2 + r3) / 2,
        "case2": lambda: m2 * m3 * r2 * r3,
        "case3": lambda: soft(m2, m3) * soft(r2, r3),
        "case4": lambda: soft(m2, m3) * (alpha * r2 * r3),
        "case5": lambda: (alpha * j) * (alpha * r2 * r3),
        "case6": lambda: (m2 + m3 + r2 + r3) / 4,
        "rec_only": lambda: a_rec(r2, r3),
        "map_only": lambda: alpha * j,
    }[variant]()
    return box(box(psi * valid, 5, 5), 7, 3)


def reference_scores(psi: np.ndarray):
    nonzero = psi[psi != 0]
    mean_nonzero = nonzero.mean() if nonzero.size else 0.0
    return (psi / (mean_nonzero + 1e-8), (psi / np.sqrt(mean_nonzero + 1e-8)).max(), psi / np.sqrt(psi.mean() + 1e-8))


# --- inputs ----------------------------------------------------------------------------------------------------------

def distance_maps(seed: int, size: int = 24):
    rng = np.random.default_rng(seed)
    valid = np.zeros((size, size))
    valid[3:-4, 5:-2] = 1.0
    maps = [rng.random((size, size)) * 1.4 * valid for _ in range(4)]
    maps[0][10:13, 10:13] += 1.5 * valid[10:13, 10:13]  # a defect
    return maps, valid


def as_torch(*arrays):
    return [torch.from_numpy(a).float() for a in arrays]


# --- tests -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", FUSION_VARIANTS)
def test_fuse_matches_the_formulas(variant: str):
    (m2, m3, r2, r3), valid = distance_maps(0)
    expected = reference_psi(m2, m3, r2, r3, valid, variant)
    actual = fuse(*as_torch(m2, m3, r2, r3, valid), variant=variant)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-4, atol=1e-6)


def test_building_blocks_match_the_formulas():
    (m2, m3, r2, r3), _ = distance_maps(1)
    j, alpha = gate(m2, m3)
    np.testing.assert_allclose(reliability_gated_mapping_anomaly(*as_torch(m2, m3)).numpy(), alpha * j, rtol=1e-5)
    np.testing.assert_allclose(confidence_weighted_reconstruction_anomaly(*as_torch(r2, r3)).numpy(), a_rec(r2, r3),
                               rtol=1e-5)


@pytest.mark.parametrize("modality", ["rgb", "xyz"])
def test_single_modality_maps(modality: str):
    (_, _, r2, r3), valid = distance_maps(2)
    distance = r2 if modality == "rgb" else r3
    pre = box(box(distance, 5, 3), 7, 2) if modality == "rgb" else distance
    expected = box(box(pre * valid, 5, 5), 7, 3)
    actual = single_modality_map(*as_torch(distance, valid), modality=modality)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-4, atol=1e-6)


def test_batches_are_scored_image_by_image():
    first, valid1 = distance_maps(3)
    second, valid2 = distance_maps(4)
    batched = fuse(*[torch.stack(as_torch(a, b)) for a, b in zip(first + [valid1], second + [valid2])])
    single = fuse(*as_torch(*first, valid1))
    torch.testing.assert_close(batched[0], single, rtol=1e-5, atol=1e-7)


def test_normalize_scores_matches_the_formulas():
    (m2, m3, r2, r3), valid = distance_maps(5)
    psi = reference_psi(m2, m3, r2, r3, valid, "full")
    psi[:2] = 0.0
    expected = reference_scores(psi)
    aupro_map, image_score, pixel_scores = normalize_scores(torch.from_numpy(psi))
    np.testing.assert_allclose(aupro_map.numpy(), expected[0], rtol=1e-10)
    assert image_score.item() == pytest.approx(expected[1], rel=1e-10)
    np.testing.assert_allclose(pixel_scores.numpy(), expected[2], rtol=1e-10)


def test_all_zero_map_scores_zero_not_nan():
    aupro_map, image_score, pixel_scores = normalize_scores(torch.zeros(2, 8, 8))
    assert image_score.tolist() == [0.0, 0.0]
    assert not aupro_map.isnan().any() and not pixel_scores.isnan().any()


def test_unknown_variant():
    (m2, m3, r2, r3), valid = distance_maps(6)
    with pytest.raises(ValueError, match="unknown fusion variant"):
        fuse(*as_torch(m2, m3, r2, r3, valid), variant="case7")
