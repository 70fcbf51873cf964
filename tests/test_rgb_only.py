"""2D-only data like the real class we develop on (MVTec 3D-AD rope: 900 × 400 RGB, no clouds): the padding that
squares a non-square image is not part of the part, and such a class runs through every command unchanged
(docs/real_data.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import calibrate
import inference
import predict
import train
from networks.features import MultimodalFeatures
from scripts.prepare_2d_class import copy_class
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.data.synthetic import SyntheticConfig, generate_dataset
from utils.data.transforms import image_area
from utils.runs.pipeline import valid_mask

HEIGHT, WIDTH = 400, 900  # rope's size


@pytest.mark.parametrize("height, width, size", [(400, 900, 224), (900, 400, 224), (3, 7, 10), (800, 800, 224)])
def test_image_area_is_the_unpadded_image_after_the_nearest_resize(height: int, width: int, size: int):
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    expected = np.zeros((size, size), dtype=bool)
    for row in range(size):  # nearest resize: output pixel i reads input pixel floor(i · side / size)
        for col in range(size):
            source_row, source_col = math.floor(row * side / size), math.floor(col * side / size)
            expected[row, col] = top <= source_row < top + height and left <= source_col < left + width
    np.testing.assert_array_equal(image_area(height, width, size).numpy(), expected)


@pytest.fixture(scope="module")
def rgb_only_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic class of 900 × 400 images without clouds, made the way rope is (scripts/prepare_2d_class.py)."""
    work = tmp_path_factory.mktemp("rgb_only")
    config = SyntheticConfig(classes=("dome",), n_train=6, n_val=2, n_test=6, size=(HEIGHT, WIDTH),
                             background="none", defects=("stain",))
    source = generate_dataset(work / "source", config)
    counts = copy_class(source / "dome", work / "data")
    assert counts["train"] == 6 and not list((work / "data").rglob("*.tiff"))
    return work / "data"


def test_prepare_2d_class_refuses_what_is_not_a_png_and_a_used_destination(rgb_only_root: Path, tmp_path: Path):
    source = tmp_path / "rope"
    image = source / "train" / "good" / "rgb" / "000.png"
    image.parent.mkdir(parents=True)
    image.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")  # never pulled
    with pytest.raises(ValueError, match="000.png"):
        copy_class(source, tmp_path / "out")
    with pytest.raises(ValueError, match="not empty"):
        copy_class(rgb_only_root / "dome", rgb_only_root)


def test_the_2d_only_valid_mask_leaves_out_the_padding(rgb_only_root: Path):
    extractor = MultimodalFeatures("lite", modality="rgb")
    dataset = MVTec3DDataset(rgb_only_root, "dome", "train", extractor.img_size, xyz="optional",
                             normalization=extractor.config.normalization)
    batch = collate_samples([dataset[0], dataset[1]])
    assert batch.xyz is None
    mask = valid_mask(batch, None, extractor).reshape(2, extractor.grid_size, extractor.grid_size)
    rows = mask.any(dim=2)  # (2, G): the grid rows that show some of the image
    assert mask[0][rows[0]].all()  # the image spans the full width ...
    shown = HEIGHT / WIDTH * extractor.grid_size  # ... and a band of 40/90 of the height, plus the pooling's reach
    assert shown <= rows[0].sum() <= shown + 4, rows[0]
    band = torch.nonzero(rows[0]).squeeze(1)
    assert torch.equal(band, torch.arange(int(band[0]), int(band[-1]) + 1))  # one band ...
    assert abs(int(band[0]) - (extractor.grid_size - 1 - int(band[-1]))) <= 1  # ... in the middle
    assert torch.equal(mask[0], mask[1])


def test_a_non_square_2d_only_class_runs_through_every_command(rgb_only_root: Path, tmp_path: Path):
    common = ["--dataset_path", str(rgb_only_root), "--preset", "lite", "--modality", "rgb", "--epochs_no", "2",
              "--batch_size", "2", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    run = tmp_path / "ckpt"
    assert train.main([*common, "--class_name", "dome", "--checkpoint_savepath", str(run)]) == 0
    assert inference.main([*common, "--class_names", "dome", "--checkpoint_folder", str(run), "--results_dir",
                           str(tmp_path / "results"), "--run_name", "rgb"]) == 0
    metrics = json.loads((tmp_path / "results" / "rgb" / "metrics.json").read_text())["classes"]["dome"]
    assert 0 <= metrics["I-AUROC"] <= 1 and 0 <= metrics["P-AUROC"] <= 1
    folder = run / "cmdr_rgb_seed115"
    folder = folder if folder.is_dir() else run
    assert calibrate.main(["--checkpoint_folder", str(folder), "--class_name", "dome", "--dataset_path",
                           str(rgb_only_root), "--device", "cpu"]) == 0
    stain = sorted((rgb_only_root / "dome" / "test" / "stain" / "rgb").iterdir())[0]
    out = tmp_path / "predicted"
    assert predict.main(["--checkpoint_folder", str(folder), "--class_name", "dome", "--rgb", str(stain),
                         "--out", str(out), "--device", "cpu"]) == 0
    line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert not line["error"] and line["decision"] in ("good", "anomalous") and line["score"] >= 0


def test_border_erosion_and_the_bank_smoothing_against_loops():
    from scripts.compare_lite_2d import erode_cells, smoothed_max

    grid = 9
    generator = torch.Generator().manual_seed(0)
    valid = torch.zeros(grid, grid, dtype=torch.bool)
    valid[2:7, 1:9] = True
    valid[4, 4] = False  # a hole: its neighbours are inside the edge too
    distances = torch.rand(grid * grid, generator=generator, dtype=torch.float64)
    for border in (0, 1, 2):
        expected = torch.zeros(grid, grid, dtype=torch.bool)
        for r in range(grid):
            for c in range(grid):
                window = [(r + dr, c + dc) for dr in range(-border, border + 1) for dc in range(-border, border + 1)]
                expected[r, c] = all(0 <= y < grid and 0 <= x < grid and valid[y, x] for y, x in window)
        cells = erode_cells(valid.flatten()[None], grid, border)[0]
        assert torch.equal(cells, expected.flatten()), border
        smooth = np.zeros((grid, grid))
        for r in range(grid):
            for c in range(grid):
                values = [float(distances[y * grid + x]) for y in range(r - 1, r + 2) for x in range(c - 1, c + 2)
                          if 0 <= y < grid and 0 <= x < grid and valid[y, x]]
                smooth[r, c] = sum(values) / len(values) if values else 0.0
        expected_max = max(smooth[r, c] for r in range(grid) for c in range(grid) if expected[r, c]) \
            if expected.any() else 0.0
        assert float(smoothed_max(distances, valid.flatten(), cells, grid)) == pytest.approx(expected_max, rel=1e-12)


def test_compare_lite_2d_runs_its_variants_once(rgb_only_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from scripts import compare_lite_2d

    out = tmp_path / "c.json"
    arguments = ["--dataset_path", str(rgb_only_root), "--class_name", "dome", "--out", str(out), "--variants",
                 "lite0_224", "stages_2", "--borders", "0", "2"]
    assert compare_lite_2d.main(arguments) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"lite0_224", "stages_2"} and set(results["stages_2"]["borders"]) == {"0", "2"}
    assert results["lite0_224"]["p_auroc"] != results["stages_2"]["p_auroc"]
    assert "| stages_2 |" in capsys.readouterr().out
    stamp = out.stat().st_mtime_ns
    assert compare_lite_2d.main(arguments) == 0 and out.stat().st_mtime_ns == stamp
