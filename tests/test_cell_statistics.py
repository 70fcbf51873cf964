"""Per-pixel normalisation of the maps by the good training parts' (networks/blocks/cell_statistics.py): the
statistics and the layout test against direct computations, what it does for aligned and for shifted parts, and
2D-only CMDR-IAD fitting it after training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import train
from networks.blocks.cell_statistics import KAPPA, LAYOUT_CORRELATION, CellStatistics
from utils.evaluation.metrics import image_auroc
from utils.runs.checkpoints import sidecar_path

SIZE = 24


def good_maps(count: int, aligned: bool, seed: int = 0) -> torch.Tensor:
    """Maps of good parts: low noise everywhere and a bright seam, at one place (aligned) or anywhere (shifted)."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0.05, 0.15, size=(count, SIZE, SIZE))
    for k in range(count):
        column = 6 if aligned else int(rng.integers(2, SIZE - 2))
        maps[k, 4:20, column] += rng.uniform(0.8, 1.0)
    return torch.from_numpy(maps)


def test_statistics_and_layout_test_equal_a_direct_computation():
    maps = good_maps(12, aligned=True)
    stats = CellStatistics(SIZE, "auto")
    decided = stats.fit(maps)
    m = maps.numpy().reshape(12, -1)
    loo = [np.corrcoef(m[k], np.delete(m, k, axis=0).mean(axis=0))[0, 1] for k in range(12)]
    assert abs(decided["layout_correlation"] - np.median(loo)) < 1e-12
    std = m.std(axis=0)
    np.testing.assert_allclose(stats.mean.numpy().ravel(), m.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.spread.numpy().ravel(), std + KAPPA * np.median(std[std > 0]), rtol=1e-6)
    psi = torch.rand(3, SIZE, SIZE)
    expected = np.maximum(0, (psi.numpy() - stats.mean.numpy()) / stats.spread.numpy())
    np.testing.assert_allclose(stats(psi).numpy(), expected, rtol=1e-6)
    assert decided["cell_norm_applied"] == (decided["layout_correlation"] >= LAYOUT_CORRELATION)


def test_aligned_parts_lose_their_seam_and_shifted_parts_are_left_alone():
    """Aligned: the seam every good part has outranks a small defect in the raw maxima, not after normalisation;
    shifted parts do not share a layout, so ``auto`` does not apply it."""
    stats = CellStatistics(SIZE, "auto")
    assert stats.fit(good_maps(40, aligned=True))["cell_norm_applied"]
    test_good = good_maps(20, aligned=True, seed=1)
    defective = good_maps(20, aligned=True, seed=2)
    defective[:, 15:17, 15:17] += 0.5  # a small defect, fainter than the seam
    maps = torch.cat([test_good, defective]).float()
    labels = [0] * 20 + [1] * 20
    raw = image_auroc(labels, maps.amax(dim=(1, 2)).tolist())
    normalised = image_auroc(labels, stats(maps).amax(dim=(1, 2)).tolist())
    assert raw < 0.7 and normalised > 0.95, (raw, normalised)  # measured: 0.46 and 1.0
    inverted = image_auroc(labels, (-stats(maps).amax(dim=(1, 2))).tolist())
    assert inverted < 0.05, "the test fails when the scores are inverted"
    shifted = CellStatistics(SIZE, "auto")
    decided = shifted.fit(good_maps(40, aligned=False))
    assert not decided["cell_norm_applied"] and torch.equal(shifted(maps), maps)
    assert CellStatistics(SIZE, "on").fit(good_maps(40, aligned=False))["cell_norm_applied"]


def test_2d_only_cmdr_fits_them_after_training(synthetic_root: Path, tmp_path: Path):
    """The statistics are a module file of the run, fitted after the last epoch on the training maps, recorded in the
    sidecar; --model_option cell_norm=off trains the paper's model without them."""
    common = ["--dataset_path", str(synthetic_root), "--class_name", "dome", "--preset", "tiny", "--random_init",
              "--epochs_no", "1", "--modality", "rgb", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert train.main([*common, "--checkpoint_savepath", str(tmp_path / "ckpt")]) == 0
    run = tmp_path / "ckpt" / "cmdr_rgb_seed115"
    sidecar = json.loads(sidecar_path(run, "dome", 1, 1).read_text())
    assert sidecar["model_options"] == {"cell_norm": "auto"}
    assert set(sidecar["after_training"]) == {"cell_norm_applied", "layout_correlation"}
    state = torch.load(run / "dome" / "cell_statistics_dome_independent_1ep_1bs.pth", weights_only=True)
    assert state["mean"].abs().sum() > 0 and bool(state["applied"]) == sidecar["after_training"]["cell_norm_applied"]
    assert train.main([*common, "--checkpoint_savepath", str(tmp_path / "off"), "--model_option",
                       "cell_norm=off"]) == 0
    assert not list((tmp_path / "off" / "cmdr_rgb_seed115" / "dome").glob("cell_statistics_*"))
