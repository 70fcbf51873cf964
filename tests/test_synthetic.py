"""The synthetic dataset generator: layout, file formats, determinism, and defects that are real but local."""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from utils.data.synthetic import (
    COLOUR_DEFECTS, DEFECT_TYPES, GEOMETRIC_DEFECTS, MARKER_FILE, SHAPES, SyntheticConfig, generate_dataset, main,
    render_sample, sample_rng,
)

SENSOR_NOISE_M = 2e-5


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_defaults_meet_the_minimum_dataset():
    config = SyntheticConfig()
    counts = config.test_counts()
    assert len(config.classes) >= 1 and config.n_train >= 10 and config.n_test >= 10
    assert sum(counts.values()) == config.n_test and counts["good"] >= 1
    assert len([d for d in counts if d != "good"]) >= 2
    assert config.size[0] != config.size[1]


def test_layout_and_file_formats(synthetic_root: Path, synthetic_config: SyntheticConfig):
    height, width = synthetic_config.size
    for class_name in synthetic_config.classes:
        class_dir = synthetic_root / class_name
        assert len(list((class_dir / "train/good/rgb").glob("*.png"))) == synthetic_config.n_train
        assert len(list((class_dir / "validation/good/xyz").glob("*.tiff"))) == synthetic_config.n_val
        test_dirs = sorted(p.name for p in (class_dir / "test").iterdir())
        assert test_dirs == sorted(synthetic_config.test_counts())
        for defect_dir in (class_dir / "test").iterdir():
            for stem in (p.stem for p in (defect_dir / "rgb").glob("*.png")):
                rgb = np.asarray(Image.open(defect_dir / "rgb" / f"{stem}.png"))
                xyz = tifffile.imread(defect_dir / "xyz" / f"{stem}.tiff")
                gt = np.asarray(Image.open(defect_dir / "gt" / f"{stem}.png"))
                assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
                assert xyz.shape == (height, width, 3) and xyz.dtype == np.float32
                assert gt.shape == (height, width) and set(np.unique(gt)) <= {0, 255}
                invalid = (xyz == 0).all(axis=-1)
                assert 0 < invalid.sum() < 0.2 * invalid.size
                assert np.all((xyz[~invalid, 2] > 0.4) & (xyz[~invalid, 2] < 0.6)), "camera distance 0.4-0.6 m"
                assert (gt.any() if defect_dir.name != "good" else not gt.any())
    assert (synthetic_root / MARKER_FILE).is_file()


def test_generation_is_deterministic_and_independent_of_other_classes(
    synthetic_root: Path, synthetic_config: SyntheticConfig, tmp_path: Path
):
    config = dataclasses.replace(synthetic_config, classes=("box",))
    generate_dataset(tmp_path / "only_box", config)
    files = _files(tmp_path / "only_box" / "box")
    assert files == _files(synthetic_root / "box")
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "only_box/box", synthetic_root / "box", files, shallow=False)
    assert not mismatch and not errors


def test_another_seed_gives_other_data(tmp_path: Path):
    a = render_sample("dome", sample_rng(0, "dome", "train", "good", 0), size=(48, 64))
    b = render_sample("dome", sample_rng(1, "dome", "train", "good", 0), size=(48, 64))
    assert not np.array_equal(a.xyz, b.xyz)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_changes_only_its_modality_and_only_where_marked(shape: str, defect: str):
    """Rendering the same scene with and without the defect isolates what the defect does."""
    nominal = render_sample(shape, sample_rng(3, shape, "test", defect, 0))
    defective = render_sample(shape, sample_rng(3, shape, "test", defect, 0), defect=defect)
    gt = defective.gt
    assert gt.sum() >= 20, "defect too small to survive resizing"
    assert gt.mean() < 0.05, "defect should be local"
    assert not nominal.gt.any()
    near_defect = ndimage.binary_dilation(gt, structure=np.ones((3, 3)), iterations=3)
    valid = ~(nominal.xyz == 0).all(-1)
    np.testing.assert_array_equal(valid, ~(defective.xyz == 0).all(-1))

    dz = np.abs(defective.xyz[..., 2] - nominal.xyz[..., 2])
    drgb = np.abs(defective.rgb.astype(int) - nominal.rgb.astype(int)).max(axis=-1)
    if defect in GEOMETRIC_DEFECTS:
        assert dz[gt & valid].max() > 10 * SENSOR_NOISE_M, "geometric defect must stand out of the sensor noise"
        assert dz.max() < 3e-3, "geometric defect must be subtle (millimetres, not centimetres)"
        assert dz[valid & ~near_defect].max() < 0.15 * dz.max()
    else:
        np.testing.assert_array_equal(defective.xyz, nominal.xyz)
    if defect in COLOUR_DEFECTS:
        assert drgb[gt].mean() > 15, "colour defect must be visible"
        assert drgb[~near_defect].max() == 0
    else:
        np.testing.assert_array_equal(defective.rgb, nominal.rgb)


def test_global_statistics_do_not_reveal_defects():
    """A broken detector that only looks at whole-image statistics must not find the defects."""
    labels, mean_depth, mean_brightness = [], [], []
    for defect in (None, *DEFECT_TYPES):
        for index in range(8 if defect is None else 3):
            sample = render_sample("torus", sample_rng(5, "torus", "test", str(defect), index), defect=defect)
            valid = ~(sample.xyz == 0).all(-1)
            labels.append(int(defect is not None))
            mean_depth.append(sample.xyz[valid, 2].mean())
            mean_brightness.append(sample.rgb.mean())
    for scores in (mean_depth, mean_brightness):
        assert 0.2 <= roc_auc_score(labels, scores) <= 0.8


def test_background_none_keeps_only_the_object():
    table = render_sample("dome", sample_rng(0, "dome", "train", "good", 0), size=(64, 80))
    removed = render_sample("dome", sample_rng(0, "dome", "train", "good", 0), size=(64, 80), background="none")
    valid_removed = ~(removed.xyz == 0).all(-1)
    assert valid_removed.mean() < 0.5 < (~(table.xyz == 0).all(-1)).mean()
    np.testing.assert_array_equal(removed.xyz[valid_removed], table.xyz[valid_removed])
    np.testing.assert_array_equal(removed.rgb, table.rgb)


def test_regeneration_replaces_stale_samples(tmp_path: Path):
    generate_dataset(tmp_path, SyntheticConfig(classes=("dome",), n_train=3, n_val=0, n_test=2, size=(40, 48)))
    generate_dataset(tmp_path, SyntheticConfig(classes=("dome",), n_train=1, n_val=0, n_test=2, size=(40, 48)))
    assert len(list((tmp_path / "dome/train/good/rgb").iterdir())) == 1


def test_refuses_to_write_into_a_foreign_folder(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not written by utils.data.synthetic"):
        generate_dataset(tmp_path, SyntheticConfig(classes=("dome",), n_train=1, n_val=0, n_test=2, size=(40, 48)))
    assert (tmp_path / "precious.txt").read_text() == "user data"
    assert main([str(tmp_path), "--classes", "1", "--n_train", "1", "--n_test", "2", "--size", "40", "48"]) == 2


@pytest.mark.parametrize(
    "kwargs", [{"classes": ("sphere",)}, {"defects": ()}, {"n_test": 1}, {"size": (16, 16)}, {"background": "x"}]
)
def test_invalid_config_is_rejected(kwargs: dict):
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)


def test_cli_accepts_a_class_count(tmp_path: Path):
    args = ["--classes", "2", "--n_train", "1", "--n_val", "1", "--n_test", "2", "--size", "40", "56", "--seed", "7"]
    assert main([str(tmp_path / "out"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == sorted(SHAPES[:2])
    assert Image.open(tmp_path / "out/dome/train/good/rgb/000.png").size == (56, 40)
