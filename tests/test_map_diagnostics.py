"""scripts/map_diagnostics.py: every distance map scored alone the way Ψ is, beside the fusion variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import inference
import train
from scripts import map_diagnostics
from utils.station.predictor import Predictor

EPOCHS = 2


def common_args(data: Path, work: Path) -> list[str]:
    return ["--dataset_path", str(data), "--preset", "tiny", "--random_init", "--epochs_no", str(EPOCHS),
            "--cache_dir", str(work / "cache"), "--device", "cpu"]


@pytest.fixture(scope="module")
def run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CMDR-IAD run of the dome class; returns the working folder (checkpoints in ckpt/)."""
    work = tmp_path_factory.mktemp("diagnostics")
    assert train.main([*common_args(synthetic_root, work), "--class_name", "dome",
                       "--checkpoint_savepath", str(work / "ckpt")]) == 0
    return work


def _box_float64(x: np.ndarray, kernel: int, passes: int) -> np.ndarray:
    for _ in range(passes):  # a k×k mean with zero padding, in float64 by scipy
        x = ndimage.uniform_filter(x, size=kernel, mode="constant", cval=0.0)
    return x


def test_a_single_map_is_scored_as_psi_is():
    rng = np.random.default_rng(0)
    distance = rng.random((2, 40, 40)) * (rng.random((2, 40, 40)) > 0.3)
    valid = rng.random((2, 40, 40)) > 0.2
    for name in ("d_map3d", "d_rec2d"):
        scores = map_diagnostics.single_map_scores(name, torch.tensor(distance, dtype=torch.float32),
                                                   torch.tensor(valid))
        for i in range(2):
            x = _box_float64(_box_float64(distance[i], 5, 3), 7, 2) if name == "d_rec2d" else distance[i]
            psi = _box_float64(_box_float64(x * valid[i], 5, 5), 7, 3)
            expected = (psi / np.sqrt(psi[psi != 0].mean() + 1e-8)).max()
            assert scores[i].item() == pytest.approx(expected, rel=1e-5)


def test_fused_rows_equal_inference(synthetic_root: Path, run: Path):
    out = run / "diagnostics.json"
    assert map_diagnostics.main(["--checkpoint_folder", str(run / "ckpt"), "--class_names", "dome",
                                 "--dataset_path", str(synthetic_root), "--device", "cpu",
                                 "--fusions", "full", "case6", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["classes"]["dome"]
    assert list(table) == [*map_diagnostics.DISTANCE_MAPS, "full", "case6"]
    for variant in ("full", "case6"):
        assert inference.main([*common_args(synthetic_root, run), "--class_names", "dome", "--checkpoint_folder",
                               str(run / "ckpt"), "--results_dir", str(run / "results"), "--run_name", variant,
                               "--fusion", variant]) == 0
        metrics = json.loads((run / "results" / variant / "metrics.json").read_text())["classes"]["dome"]
        assert table[variant]["all"] == pytest.approx(metrics["I-AUROC"], abs=1e-9)
        assert {k: v for k, v in table[variant].items() if k != "all"} == pytest.approx(
            metrics["I-AUROC per defect type"], abs=1e-9)


@pytest.mark.parametrize("oracle", map_diagnostics.DISTANCE_MAPS)
def test_each_row_scores_its_own_map(synthetic_root: Path, run: Path, monkeypatch: pytest.MonkeyPatch,
                                     oracle: str):
    """One map marks the defects, the others mark a spot on the good parts only: the oracle's row must rank every
    defective sample first, every other row last."""
    predictor = Predictor.load(run / "ckpt", "dome", "cpu")
    grid = predictor.model.config.grid_size
    current = {}
    real_collate = map_diagnostics.collate_samples

    def recording_collate(samples):
        current["batch"] = batch = real_collate(samples)
        return batch

    def planted_maps(f2d, f3d, mask):
        batch, valid = current["batch"], mask.reshape(-1, grid, grid).float()
        defect = F.adaptive_max_pool2d(batch.gt, grid)[:, 0]
        spot = torch.zeros_like(valid)
        spot[:, grid // 2 - 2:grid // 2 + 2, grid // 2 - 2:grid // 2 + 2] = 1.0
        good_spot = spot * (batch.label == 0).float()[:, None, None]
        return {name: (0.5 + 10.0 * (defect if name == oracle else good_spot)) * valid
                for name in map_diagnostics.DISTANCE_MAPS}

    monkeypatch.setattr(map_diagnostics, "collate_samples", recording_collate)
    monkeypatch.setattr(predictor.model, "distance_maps", planted_maps)
    scores, labels, defect_types = map_diagnostics.score_test_split(predictor, synthetic_root, ("full",))
    table = map_diagnostics.class_table(scores, labels, defect_types)
    for name in map_diagnostics.DISTANCE_MAPS:
        assert table[name]["all"] == (1.0 if name == oracle else 0.0), name


def test_other_methods_are_refused(synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    assert train.main([*common_args(synthetic_root, tmp_path), "--class_name", "dome", "--model", "cfm",
                       "--checkpoint_savepath", str(tmp_path / "ckpt")]) == 0
    run_folder = next((tmp_path / "ckpt").iterdir())
    assert map_diagnostics.main(["--checkpoint_folder", str(run_folder), "--class_names", "dome",
                                 "--dataset_path", str(synthetic_root), "--device", "cpu"]) == 1
    assert "need a CMDR-IAD 2D+3D run, this one is cfm" in caplog.text


def test_compare_lite_3d_trains_each_variant_once_and_tabulates_them(synthetic_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture):
    from networks.features import PRESETS
    from scripts import compare_lite_3d

    before = set(PRESETS)
    arguments = ["--dataset_path", str(synthetic_root), "--class_names", "dome", "--out", str(tmp_path),
                 "--variants", "geometry", "fpfh", "--epochs_no", "1"]
    try:
        assert compare_lite_3d.main(arguments) == 0
        table = capsys.readouterr().out
        for name in ("geometry", "fpfh"):
            result = json.loads((tmp_path / f"{name}.json").read_text())["dome"]
            assert {"full", "map_only", "rec_only", "case6", "d_rec2d"} <= set(result)
            assert f"| {name} | {100 * result['full']['all']:.1f} " in table
        # the variants' 3D branches differ, so their cache entries and runs do
        assert json.loads((tmp_path / "geometry.json").read_text()) != json.loads((tmp_path / "fpfh.json").read_text())
        stamp = (tmp_path / "geometry.json").stat().st_mtime_ns
        assert compare_lite_3d.main(arguments) == 0  # done variants are read back, not trained again
        assert (tmp_path / "geometry.json").stat().st_mtime_ns == stamp
    finally:
        for name in set(PRESETS) - before:
            del PRESETS[name]
