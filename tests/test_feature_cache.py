"""The feature cache: exact round trip, no stale reuse, recovery from damaged entries, clear errors."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from networks.features import FEATURE_PIPELINE_VERSION, PRESETS, MultimodalFeatures
from utils.data.io import DatasetError
from utils.data.mvtec3d import MVTec3DDataset, collate_samples, make_dataloader
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import open_split

IMG_SIZE = PRESETS["tiny"].img_size


@pytest.fixture(scope="module")
def extractor() -> MultimodalFeatures:
    return MultimodalFeatures("tiny", random_init=True)


@pytest.fixture
def batch(dataset_copy: Path):
    dataset = MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)
    return collate_samples([dataset[0], dataset[1]])


def test_round_trip_is_exact(extractor: MultimodalFeatures, batch, tmp_path: Path):
    fresh = extractor.get_features_maps(batch.rgb, batch.xyz)
    cache = FeatureCache(extractor, tmp_path / "cache")
    computed = cache.features(batch)
    assert (cache.hits, cache.misses) == (0, 4)
    cached = cache.features(batch)
    assert (cache.hits, cache.misses) == (4, 4)
    for a, b, c in zip(fresh, computed, cached):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(("preset", "width"), [("lite", 152), ("lite_fpfh", 33), ("lite with FPFH", 185)])
def test_lite_round_trip_is_exact(dataset_copy: Path, tmp_path: Path, preset: str, width: int):
    """Geometry-image grids, per-point FPFH parts and EfficientNet grids come back bit for bit; the lite presets
    have their own entries."""
    from networks.features import FPFHConfig
    from networks.extractors.geometry_images import GeometryImagesConfig

    if preset == "lite with FPFH":  # geometry images and FPFH concatenated (GeometryImagesConfig.fpfh)
        preset = dataclasses.replace(PRESETS["lite"], xyz=GeometryImagesConfig(fpfh=FPFHConfig(grid_stride=2)))
    extractor = MultimodalFeatures(preset)
    dataset = open_split(extractor, dataset_copy, "dome", "train", "rgbxyz")
    batch = collate_samples([dataset[0], dataset[1]])
    fresh = extractor.get_features_maps(batch.rgb, batch.xyz)
    cache = FeatureCache(extractor, tmp_path / "cache")
    computed = cache.features(batch)
    cached = cache.features(batch)
    assert (cache.hits, cache.misses) == (4, 4)
    for a, b, c in zip(fresh, computed, cached):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert fresh[1].shape == (2, 56 * 56, width)


def test_another_feature_pipeline_version_recomputes(extractor: MultimodalFeatures, batch, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    cache = FeatureCache(extractor, tmp_path / "cache")
    cache.features(batch)
    cache.features(batch)
    assert (cache.hits, cache.misses) == (4, 4)
    # the code changed
    monkeypatch.setattr("utils.runs.feature_cache.FEATURE_PIPELINE_VERSION", FEATURE_PIPELINE_VERSION + 1)
    cache.features(batch)
    assert (cache.hits, cache.misses) == (4, 8)
    cache.features(batch)
    assert (cache.hits, cache.misses) == (8, 8), "the recomputed entries carry the new version"


def test_another_fpfh_version_changes_only_the_fpfh_fingerprint(monkeypatch: pytest.MonkeyPatch):
    """FPFH carries its own implementation version: a change there invalidates lite_fpfh's 3D cache entries only."""
    lite = MultimodalFeatures("lite_fpfh")
    tiny = MultimodalFeatures("tiny", random_init=True)
    before = {name: (e.fingerprint("rgb"), e.fingerprint("xyz")) for name, e in (("lite", lite), ("tiny", tiny))}
    monkeypatch.setattr("networks.features.FPFH_VERSION", 99)
    lite, tiny = MultimodalFeatures("lite_fpfh"), MultimodalFeatures("tiny", random_init=True)
    assert (lite.fingerprint("rgb"), tiny.fingerprint("rgb"), tiny.fingerprint("xyz")) == (
        before["lite"][0], before["tiny"][0], before["tiny"][1])
    assert lite.fingerprint("xyz") != before["lite"][1]


def test_another_geometry_images_version_changes_only_their_fingerprint(monkeypatch: pytest.MonkeyPatch):
    """Geometry images carry their own version too: lite's 3D entries change, lite_fpfh's and the RGB's stay."""
    extractors = lambda: {name: MultimodalFeatures(name) for name in ("lite", "lite_fpfh")}  # noqa: E731
    before = {name: (e.fingerprint("rgb"), e.fingerprint("xyz")) for name, e in extractors().items()}
    monkeypatch.setattr("networks.features.GEOMETRY_IMAGES_VERSION", 99)
    after = {name: (e.fingerprint("rgb"), e.fingerprint("xyz")) for name, e in extractors().items()}
    assert after["lite_fpfh"] == before["lite_fpfh"] and after["lite"][0] == before["lite"][0]
    assert after["lite"][1] != before["lite"][1]


def test_fpfh_grid_stride_is_in_the_fingerprint_only_when_set():
    """The stride changes lite_fpfh's 3D fingerprint; FPFH on every point (BTF, Shape-Guided) keeps its old key, so
    their caches and fitted banks stay valid."""
    from networks.features import ExtractorConfig, FPFHConfig

    def xyz_fingerprint(stride: int) -> str:
        config = dataclasses.replace(PRESETS["lite"], xyz=FPFHConfig(grid_stride=stride))
        return MultimodalFeatures(config, modality="xyz").fingerprint("xyz")

    assert "grid_stride" not in ExtractorConfig(xyz=FPFHConfig()).to_dict()["xyz"]
    assert PRESETS["lite_fpfh"].to_dict()["xyz"]["grid_stride"] == 2
    assert len({xyz_fingerprint(1), xyz_fingerprint(2), xyz_fingerprint(3)}) == 3


def test_changed_configuration_never_reuses_entries(extractor: MultimodalFeatures, batch, tmp_path: Path):
    FeatureCache(extractor, tmp_path).features(batch)
    other = MultimodalFeatures("tiny", random_init=True, bn_mode="running")
    cache = FeatureCache(other, tmp_path)
    _, f3d = cache.features(batch)
    assert (cache.hits, cache.misses) == (2, 2), "the 3D entries are recomputed, the unchanged RGB ones reused"
    assert torch.equal(f3d, other.get_features_maps(batch.rgb, batch.xyz)[1])


def test_changed_weights_change_the_fingerprint():
    a = MultimodalFeatures("tiny", random_init=True, modality="xyz")
    b = MultimodalFeatures("tiny", random_init=True, modality="xyz")
    with torch.no_grad():
        b.xyz_backbone.norm.weight[0] += 1e-3
    assert a.fingerprint("xyz") != b.fingerprint("xyz")


def test_truncated_entry_is_recomputed(extractor, batch, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = FeatureCache(extractor, tmp_path)
    expected = cache.features(batch)
    entry = cache.entry_path("xyz", batch.records[0])
    entry.write_bytes(entry.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(extractor, tmp_path)
        result = again.features(batch)
    assert "unreadable cache entry" in caplog.text and again.misses == 1
    assert torch.equal(result[1], expected[1])
    assert torch.load(entry, weights_only=True)["format"] == 1  # rewritten whole


def test_changed_source_file_is_recomputed(extractor, dataset_copy: Path, tmp_path: Path):
    dataset = MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)
    cache = FeatureCache(extractor, tmp_path)
    before = cache.features(collate_samples([dataset[0]]))[1]
    path = dataset.records[0].xyz_path
    xyz = tifffile.imread(path)
    xyz[..., 2] += 0.01
    tifffile.imwrite(path, xyz, photometric="rgb")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    cache = FeatureCache(extractor, tmp_path)
    after = cache.features(collate_samples([dataset[0]]))[1]
    assert cache.misses == 1 and not torch.equal(before, after)


def test_precompute_fills_the_cache(extractor, dataset_copy: Path, tmp_path: Path):
    dataset = MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)
    cache = FeatureCache(extractor, tmp_path)
    cache.precompute(dataset, batch_size=3)
    assert cache.misses == 2 * len(dataset)
    for batch in make_dataloader(dataset, batch_size=2):
        cache.features(batch)
    assert cache.misses == 2 * len(dataset) and cache.hits == 2 * len(dataset)


def test_disabled_cache_computes_every_time(extractor, batch):
    cache = FeatureCache(extractor, None)
    cache.features(batch)
    cache.features(batch)
    assert cache.misses == 8 and cache.hits == 0


def test_cloud_with_too_few_points_names_the_file(extractor, dataset_copy: Path, tmp_path: Path):
    dataset = MVTec3DDataset(dataset_copy, "dome", "train", img_size=IMG_SIZE)
    path = dataset.records[1].xyz_path
    tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)), photometric="rgb")
    with pytest.raises(DatasetError, match=rf"{path.name}: point cloud has 0 valid points"):
        FeatureCache(extractor, tmp_path).features(collate_samples([dataset[0], dataset[1]]))
