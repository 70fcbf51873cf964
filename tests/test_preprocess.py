"""Background removal on generated scenes: table and floating blob removed, object kept, non-destructive, stable."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.cluster import DBSCAN

from processing.preprocess_mvtec import (
    BackgroundRemovalConfig, border_points, dbscan_labels, fit_plane, main, pad_to_multiple, ransac_plane,
    remove_background,
)
from utils.data.mvtec3d import PREPROCESSED_MARKER, is_background_removed
from utils.data.synthetic import SyntheticConfig, generate_dataset, render_sample, sample_rng

CONFIG = BackgroundRemovalConfig()
SIZE = (120, 150)
PITCH_MM = 0.5  # a 60 × 75 mm scene: the object is ~18 mm wide and tall, well above the 5 mm plane cut


def scene(seed: int = 0, shape: str = "dome"):
    """A raw scene (tilted table + object + dropouts) with a floating blob 20 mm above a table corner."""
    sample = render_sample(shape, sample_rng(seed, shape, "test", "good", 0), size=SIZE, pixel_pitch_mm=PITCH_MM)
    nominal = render_sample(shape, sample_rng(seed, shape, "test", "good", 0), size=SIZE, pixel_pitch_mm=PITCH_MM,
                            background="none")
    xyz = sample.xyz.copy()
    blob = np.zeros(SIZE, dtype=bool)
    blob[14:22, 112:122] = True  # 80 points, far from the object
    xyz[blob, 2] -= 0.02  # towards the camera
    valid = (xyz != 0).all(-1)
    obj = (nominal.xyz != 0).all(-1)
    table = valid & ~obj & ~blob
    return xyz, obj, table, blob


def test_ransac_matches_an_independent_plane_fit():
    xyz, _, _, _ = scene()
    points = border_points(xyz, CONFIG.border)
    normal, offset = ransac_plane(points, CONFIG, np.random.default_rng(0))
    # independent: least squares z = a·x + b·y + c on the border points (all table there)
    design = np.c_[points[:, 0], points[:, 1], np.ones(len(points))]
    a, b, c = np.linalg.lstsq(design, points[:, 2], rcond=None)[0]
    expected = np.array([a, b, -1.0]) / np.linalg.norm([a, b, -1.0])
    sign = np.sign(normal @ expected)
    np.testing.assert_allclose(sign * normal, expected, atol=1e-4)
    assert abs(sign * offset - c / np.linalg.norm([a, b, -1.0])) < 1e-4


def test_fit_plane_recovers_a_known_plane():
    rng = np.random.default_rng(1)
    normal = np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0])
    u = np.cross(normal, [1.0, 0, 0])
    v = np.cross(normal, u)
    points = rng.normal(size=(60, 1)) * u + rng.normal(size=(60, 1)) * v - 0.5 * normal
    fitted, offset = fit_plane(points)
    assert abs(abs(fitted @ normal) - 1) < 1e-12 and abs(abs(offset) - 0.5) < 1e-12


def test_table_and_blob_removed_object_kept():
    xyz, obj, table, blob = scene()
    cleaned = remove_background(xyz, CONFIG, np.random.default_rng(0))
    assert cleaned.shape == (200, 200, 3) and cleaned.dtype == np.float32
    top, left = (200 - SIZE[0]) // 2, (200 - SIZE[1]) // 2
    inner = cleaned[top : top + SIZE[0], left : left + SIZE[1]]
    kept = (inner != 0).all(-1)
    assert not kept[table].any(), "table removed"
    assert not kept[blob].any(), "floating blob removed"
    assert kept[obj].mean() > 0.95, "the object is kept"
    np.testing.assert_array_equal(inner[kept], xyz[kept])  # kept points unchanged
    assert not (cleaned != 0).any(-1)[:top].any(), "padding is zero"


@pytest.mark.parametrize(("shape", "side"), [((120, 150), 200), ((600, 800), 800), ((100, 100), 100), ((101, 30), 200)])
def test_padding_to_a_multiple_of_100(shape: tuple[int, int], side: int):
    padded = pad_to_multiple(np.ones(shape + (3,)), 100)
    assert padded.shape == (side, side, 3) and padded.sum() == np.prod(shape) * 3
    top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
    assert padded[top : top + shape[0], left : left + shape[1]].all()


def test_dbscan_matches_scikit_learn():
    rng = np.random.default_rng(2)
    clusters = [rng.normal(scale=0.002, size=(300, 3)) + centre for centre in ([0, 0, 0.5], [0.03, 0, 0.5])]
    chain = np.c_[np.linspace(0.06, 0.09, 40), np.zeros(40), np.full(40, 0.5)]  # a thin line: core chain
    noise = rng.uniform(-0.05, 0.15, size=(40, 3)) + [0, 0, 0.5]
    points = np.concatenate(clusters + [chain, noise])
    ours = dbscan_labels(points, 0.006, 30)
    reference = DBSCAN(eps=0.006, min_samples=30).fit_predict(points)
    assert np.array_equal(ours == -1, reference == -1)
    for label in np.unique(reference[reference >= 0]):  # same partition, labels may be numbered differently
        assert len(np.unique(ours[reference == label])) == 1
    assert len(np.unique(ours[ours >= 0])) == len(np.unique(reference[reference >= 0]))


def test_too_few_border_points_is_an_error():
    xyz = np.zeros((50, 50, 3), dtype=np.float32)
    xyz[20:30, 20:30] = 0.5
    with pytest.raises(ValueError, match="fewer than the 50 RANSAC needs"):
        remove_background(xyz, CONFIG, np.random.default_rng(0))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SyntheticConfig(classes=("dome",), n_train=2, n_val=0, n_test=3, size=SIZE, pixel_pitch_mm=PITCH_MM)
    return generate_dataset(tmp_path_factory.mktemp("raw"), config)


def test_command_is_non_destructive_and_idempotent(raw_dataset: Path, tmp_path: Path):
    before = _tree_digest(raw_dataset)
    assert main([str(raw_dataset), "--out", str(tmp_path / "a"), "--workers", "2"]) == 0
    assert main([str(raw_dataset), "--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    assert _tree_digest(raw_dataset) == before, "the raw data is never modified"
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    a.pop(PREPROCESSED_MARKER), b.pop(PREPROCESSED_MARKER)
    assert a == b, "identical output whatever the number of workers"
    assert main([str(raw_dataset), "--out", str(tmp_path / "a"), "--workers", "1"]) == 0  # a rerun into the same out
    rerun = _tree_digest(tmp_path / "a")
    rerun.pop(PREPROCESSED_MARKER)
    assert rerun == b
    marker = json.loads((tmp_path / "a" / PREPROCESSED_MARKER).read_text())
    assert marker["parameters"]["ransac_threshold"] == 0.004 and marker["failed"] == {}
    assert is_background_removed(tmp_path / "a") and not is_background_removed(raw_dataset)
    rgb = tmp_path / "a/dome/test/good/rgb/000.png"
    assert rgb.read_bytes() == (raw_dataset / "dome/test/good/rgb/000.png").read_bytes()
    assert tifffile.imread(tmp_path / "a/dome/test/good/xyz/000.tiff").shape == (200, 200, 3)


def test_pad_rgb_gt(raw_dataset: Path, tmp_path: Path):
    assert main([str(raw_dataset), "--out", str(tmp_path / "out"), "--workers", "1", "--pad_rgb_gt"]) == 0
    with Image.open(tmp_path / "out/dome/test/good/rgb/000.png") as rgb, \
            Image.open(tmp_path / "out/dome/test/good/gt/000.png") as gt:
        assert rgb.size == gt.size == (200, 200)


def test_refuses_processed_input_and_foreign_output(raw_dataset: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture):
    assert main([str(raw_dataset), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    with caplog.at_level(logging.ERROR):
        assert main([str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--workers", "1"]) == 2
    assert "already background-removed" in caplog.text
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main([str(raw_dataset), "--out", str(tmp_path / "foreign"), "--workers", "1"]) == 2
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert main([str(raw_dataset), "--out", str(raw_dataset / "inside"), "--workers", "1"]) == 2


def test_failing_file_is_reported_and_others_processed(raw_dataset: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture):
    raw = tmp_path / "raw"
    for path in raw_dataset.rglob("*"):
        if path.is_file():
            (raw / path.relative_to(raw_dataset)).parent.mkdir(parents=True, exist_ok=True)
            (raw / path.relative_to(raw_dataset)).write_bytes(path.read_bytes())
    broken = raw / "dome/train/good/xyz/001.tiff"
    tifffile.imwrite(broken, np.zeros((*SIZE, 3), np.float32), photometric="rgb")
    with caplog.at_level(logging.ERROR):
        assert main([str(raw), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "001.tiff" in caplog.text and "RANSAC" in caplog.text
    assert (tmp_path / "out/dome/train/good/xyz/000.tiff").is_file()
    assert not (tmp_path / "out/dome/train/good/xyz/001.tiff").exists()
    marker = json.loads((tmp_path / "out" / PREPROCESSED_MARKER).read_text())
    assert list(marker["failed"]) == ["dome/train/good/xyz/001.tiff"]
