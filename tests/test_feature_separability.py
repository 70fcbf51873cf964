"""The nearest-neighbour separability check of the frozen features (scripts/feature_separability.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import feature_separability
from scripts.feature_separability import class_separability, main, nearest_neighbour_distances
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import RunConfig, prepare_run


def test_nearest_neighbour_distances_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 7, generator=generator) * torch.rand(300, 1, generator=generator) * 5
    queries = torch.randn(50, 7, generator=generator)
    b = bank.double().numpy()
    q = queries.double().numpy()
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = [min(np.sqrt(((qi - bj) ** 2).sum()) for bj in b) for qi in q]
    np.testing.assert_allclose(nearest_neighbour_distances(bank, queries).numpy(), expected, atol=1e-5)


def test_distances_do_not_depend_on_the_query_chunk(monkeypatch: pytest.MonkeyPatch):
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(40, 5, generator=generator), torch.randn(23, 5, generator=generator)
    whole = nearest_neighbour_distances(bank, queries)
    monkeypatch.setattr(feature_separability, "QUERY_CHUNK", 4)
    torch.testing.assert_close(nearest_neighbour_distances(bank, queries), whole)


@pytest.fixture(scope="module")
def tiny_cache(synthetic_root: Path) -> FeatureCache:
    _, cache = prepare_run(RunConfig(dataset_path=synthetic_root, preset="tiny", random_init=True, cache_dir=None,
                                     device="cpu"))
    return cache


def test_features_that_mark_the_defects_separate_perfectly(synthetic_root: Path, tiny_cache: FeatureCache,
                                                          monkeypatch: pytest.MonkeyPatch, check_measured):
    """The check must be able to say "separable": features that point elsewhere on gt pixels score 1.0."""
    real_features = tiny_cache.features

    def marked(batch):
        f2d, f3d = real_features(batch)
        defect = batch.gt.flatten(1) > 0  # (B, P)
        marker = torch.zeros_like(f3d)
        marker[..., 0] = 100.0 * f3d.norm(dim=-1)
        return f2d, torch.where(defect[..., None] & (f3d != 0).any(-1, keepdim=True), marker, f3d)

    monkeypatch.setattr(tiny_cache, "features", marked)
    result = class_separability(tiny_cache, synthetic_root, "dome", "rgbxyz", bank_stride=1)
    assert set(result) == {"F2D", "F3D"}
    check_measured("F3D I-AUROC", result["F3D"]["i_auroc"], minimum=1.0)
    check_measured("F3D P-AUROC", result["F3D"]["p_auroc"], minimum=0.99)
    check_measured("F3D I-AUROC, worst defect type", min(result["F3D"]["i_auroc_per_defect"].values()), minimum=1.0)
    # the unmarked branch is not separated by construction
    check_measured("F2D I-AUROC", result["F2D"]["i_auroc"], maximum=0.999)


def test_command_line_writes_json(synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "separability.json"
    assert main(["--dataset_path", str(synthetic_root), "--class_names", "box", "--preset", "tiny",
                 "--random_init", "--modality", "xyz", "--cache_dir", "none", "--device", "cpu",
                 "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    result = document["classes"]["box"]
    assert set(result) == {"F3D"}
    assert 0.0 <= result["F3D"]["i_auroc"] <= 1.0
    assert result["F3D"]["bank_size"] > 0
    assert document["config"]["bank_stride"] == 4


def test_missing_weights_are_an_error_not_random_features(synthetic_root: Path, tmp_path: Path):
    assert main(["--dataset_path", str(synthetic_root), "--class_names", "dome", "--preset", "tiny",
                 "--cache_dir", "none", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
