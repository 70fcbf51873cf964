"""The reproduction runner (resumable, per class) and the figure panels, with the tiny preset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

import inference
from scripts import make_figures, reproduce
from utils.evaluation.metrics import METRIC_KEYS


def tiny(data: Path, work: Path, modality: str = "rgbxyz") -> list[str]:
    return ["--dataset_path", str(data), "--preset", "tiny", "--random_init", "--epochs_no", "1", "--modality",
            modality, "--cache_dir", str(work / "cache"), "--device", "cpu"]


def test_runner_is_resumable(synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    args = [*tiny(synthetic_root, tmp_path), "--class_name", "all", "--checkpoint_savepath", str(tmp_path / "ckpt"),
            "--results_dir", str(tmp_path / "results"), "--run_name", "row"]
    assert reproduce.main(args) == 0
    run = tmp_path / "results" / "row"
    assert sorted(p.stem for p in (run / "classes").glob("*.json")) == ["box", "dome"]
    first = json.loads((run / "metrics.json").read_text())
    (run / "classes" / "box.json").unlink()  # as if interrupted while evaluating box
    with caplog.at_level(logging.INFO):
        assert reproduce.main(args) == 0
    assert "dome: done earlier, skipped" in caplog.text and "box: already trained" in caplog.text
    again = json.loads((run / "metrics.json").read_text())["classes"]
    for class_name in ("box", "dome"):  # the same numbers (timings aside)
        assert {k: again[class_name][k] for k in METRIC_KEYS} == {k: first["classes"][class_name][k] for k in METRIC_KEYS}


def test_figure_panels(synthetic_root: Path, tmp_path: Path):
    runs = []
    for modality in ("rgb", "xyz", "rgbxyz"):
        common = [*tiny(synthetic_root, tmp_path, modality), "--checkpoint_savepath", str(tmp_path / modality)]
        assert reproduce.main([*common, "--class_name", "dome", "--results_dir", str(tmp_path / "results"),
                               "--run_name", modality, "--save_raw_maps"]) == 0
        runs.append(tmp_path / "results" / modality)
    assert len(list((runs[0] / "maps" / "dome").glob("*.npy"))) == 8
    out = tmp_path / "figures"
    assert make_figures.main(["--dataset_path", str(synthetic_root), "--runs", *map(str, runs), "--out", str(out)]) == 0
    with Image.open(out / "dome.png") as figure:
        n_defect_types = len({p.stem.split("_")[0] for p in (runs[0] / "maps" / "dome").glob("*.npy")})
        assert figure.width == 6 * 224 and figure.height == 18 + n_defect_types * 224


def test_figures_need_raw_maps(synthetic_root: Path, tmp_path: Path):
    args = [*tiny(synthetic_root, tmp_path), "--class_names", "dome", "--checkpoint_folder", str(tmp_path / "c")]
    assert inference.main(args) == 1  # nothing trained: a clear error, no maps
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": {"modality": "rgb"}}))
    assert make_figures.main(["--dataset_path", str(synthetic_root), "--runs", str(tmp_path / "run"),
                              "--out", str(tmp_path / "f")]) == 1
