"""scripts/real_benchmark.py on a small synthetic class (real data cannot be in CI): one record per run, the table
with the mean and spread over seeds, resumed runs skipped, a class without clouds keeps its 2D rows only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts import real_benchmark


def test_the_table_of_every_row_over_seeds_and_a_rerun_that_skips_them(synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "real"
    common = ["--dataset_path", str(synthetic_root), "--class_name", "dome", "--out", str(out), "--epochs_no", "1",
              "--cache_dir", str(tmp_path / "cache"), "--checkpoint_savepath", str(tmp_path / "ckpt"),
              "--seeds", "115", "1"]
    assert real_benchmark.main([*common, "--rows", "cmdr", "patchcore"]) == 0
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["cmdr_seed1.json", "cmdr_seed115.json", "patchcore_seed115.json"], "memory banks: one fit"
    records = [json.loads((out / "runs" / name).read_text()) for name in runs[:2]]
    table = json.loads((out / "table.json").read_text())
    values = [r["metrics"]["I-AUROC"] for r in records]
    assert table["cmdr"]["I-AUROC"] == {"mean": pytest.approx(sum(values) / 2), "min": min(values),
                                        "max": max(values)}
    assert table["cmdr"]["seeds"] == [115, 1] and table["patchcore"]["seeds"] == [115]
    for record in records:
        assert record["train_seconds"] > 0 and record["feature_seconds_per_part"] > 0
        assert record["metrics"]["n_test"] == 8
    markdown = (out / "table.md").read_text()
    assert "| cmdr | 2 |" in markdown and "| patchcore | 1 |" in markdown
    written = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert real_benchmark.main([*common, "--rows", "cmdr", "patchcore"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == written, "nothing run again"
    # a later invocation with another seed adds to the row; the table keeps the runs of the earlier ones
    assert real_benchmark.main([*common[:-3], "--seeds", "2", "--rows", "cmdr"]) == 0
    assert json.loads((out / "table.json").read_text())["cmdr"]["seeds"] == [2, 115, 1]


def test_a_class_without_clouds_keeps_its_2d_rows(synthetic_root: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture):
    flat = tmp_path / "flat"
    shutil.copytree(synthetic_root / "dome", flat / "dome", ignore=shutil.ignore_patterns("xyz"))
    assert real_benchmark.main(["--dataset_path", str(flat), "--class_name", "dome", "--out", str(tmp_path / "r"),
                                "--epochs_no", "1", "--cache_dir", str(tmp_path / "cache"), "--checkpoint_savepath",
                                str(tmp_path / "ckpt"), "--seeds", "115", "--rows", "cmdr", "cmdr_rgb"]) == 0
    assert "has no point clouds: skipping cmdr" in caplog.text
    assert list(json.loads((tmp_path / "r" / "table.json").read_text())) == ["cmdr_rgb"]
