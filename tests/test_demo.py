"""demo.py with the tiny preset and weight files passed through (the lite default runs in CI as the README's first
command, and tests/test_detection.py checks what it detects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import demo
from networks.features import PRESETS, build_rgb_backbone, build_xyz_backbone


def test_demo_passes_weight_files_to_training_and_inference(tmp_path: Path):
    tiny = PRESETS["tiny"]
    rgb, pointmae = tmp_path / "vit.pth", tmp_path / "pointmae.pth"
    torch.save(build_rgb_backbone(tiny, random_init=True).state_dict(), rgb)
    encoder = build_xyz_backbone(tiny, random_init=True)
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in encoder.state_dict().items()}}, pointmae)

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--preset", "tiny", "--epochs_no", "1", "--n_train", "4", "--n_test", "6",
                      "--rgb_weights", str(rgb), "--pointmae_weights", str(pointmae)]) == 0
    run = out / "results" / "cmdr_tiny_demo"
    extractor = json.loads((run / "metrics.json").read_text())["config"]["extractor"]
    assert extractor["rgb_weights"] == str(rgb) and extractor["pointmae_weights"] == str(pointmae)
    assert sorted(p.name for p in (run / "maps" / "dome").glob("good_*.png"))
    assert (out / "checkpoints" / "tiny" / "dome").is_dir()
    assert "calibrated threshold" in (run / "report.html").read_text(), "the demo calibrates its run"


def test_paper_demo_without_weights_stops_with_a_clear_error(tmp_path: Path, offline_without_weights: Path,
                                                             caplog: pytest.LogCaptureFixture):
    assert demo.main(["--out", str(tmp_path / "demo"), "--preset", "paper", "--device", "cpu"]) == 1
    assert "--rgb_weights" in caplog.text
    assert not (tmp_path / "demo" / "checkpoints" / "paper").exists()
