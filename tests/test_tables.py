"""The table builder (paper numbers beside ours, Δ, both AUPRO protocols) and the Table 4 benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts.make_tables import PAPER_RESULTS, main
from utils.data.mvtec3d import MVTEC3D_CLASSES
from utils.evaluation.metrics import METRIC_KEYS
from utils.evaluation.results import write_results


def fake_run(root: Path, name: str, modality: str, fusion: str, value: float, model: str | None = None) -> Path:
    """A result folder as inference.py writes it, every metric equal to ``value`` (a fraction); ``model`` None:
    a run written before there were several methods (CMDR-IAD)."""
    per_class = {c: {**{k: value for k in METRIC_KEYS}, "n_test": 10, "n_anomalous": 5, "eval_seconds": 1.0,
                     "eval_samples_per_second": 10.0}
                 for c in ("bagel", "tire")}
    per_class["tire"]["AUPRO@30%"] = math.nan
    config = {"modality": modality, "fusion": fusion, **({"model": model} if model else {})}
    write_results(root / name, config, per_class)
    return root / name


def test_paper_numbers_are_transcribed_consistently():
    paper = json.loads(PAPER_RESULTS.read_text())
    assert paper["table1_i_auroc"]["2D+3D"]["mean"] == 97.3
    assert paper["table1_i_auroc"]["2D+3D"] == paper["table10_fusion_per_class"]["full"]["I-AUROC"]
    assert paper["table3_aupro1"]["2D+3D"] == paper["table10_fusion_per_class"]["full"]["AUPRO@1%"]
    for table in ("table1_i_auroc", "table2_aupro30", "table9_p_auroc"):
        for setting, row in paper[table].items():
            assert list(row) == [*MVTEC3D_CLASSES, "mean"], (table, setting)
            assert abs(sum(row[c] for c in MVTEC3D_CLASSES) / 10 - row["mean"]) < 0.06, (table, setting)


def test_tables_from_runs(tmp_path: Path):
    runs = [fake_run(tmp_path, "rgb", "rgb", "full", 0.80), fake_run(tmp_path, "full", "rgbxyz", "full", 0.95),
            fake_run(tmp_path, "case6", "rgbxyz", "case6", 0.90)]
    assert main(["--runs", *map(str, runs), "--out", str(tmp_path / "tables")]) == 0
    markdown = (tmp_path / "tables" / "tables.md").read_text()
    # Table 1, 2D: ours 80.0 on bagel, paper 82.4, Δ −2.4; classes we did not run show —
    t1 = markdown.split("### Table 1")[1].split("###")[0]
    assert "| 2D ours | 80.0 | — |" in t1 and "| 2D paper | 82.4 | 63.6 |" in t1 and "| 2D Δ | -2.4 | — |" in t1
    assert "| 3D ours | — |" in t1
    # AUPRO rows: the 99-threshold value is compared with the paper, the exact one shown on its own row
    t2 = markdown.split("### Table 2")[1].split("###")[0]
    assert "2D+3D ours (99 thr) | 95.0" in t2 and "2D+3D ours (exact) | 95.0" in t2 and "2D+3D paper | 98.0" in t2
    assert "| 2D+3D ours (exact) | 95.0 | — | — | — | — | — | — | — | — | —" in t2  # tire's NaN shows as —
    t7 = markdown.split("### Table 7")[1].split("###")[0]
    assert "| case6 ours (AUPRO 99 thr) | 90.0 | 90.0 | 90.0 | 90.0 |" in t7 and "| case6 paper | 95.0 |" in t7
    assert "| case1 ours (AUPRO 99 thr) | — |" in t7
    assert "Table 10" in markdown and "Table 6" in markdown and "Table 9" in markdown
    latex = (tmp_path / "tables" / "tables.tex").read_text()
    assert latex.count(r"\begin{tabular}") == 9 and r"$\Delta$" in latex and "AUPRO@30\\%" in latex
    # every table row has as many cells as its header
    for table in markdown.split("###")[1:]:
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert rows and all(row.count(" | ") == rows[0].count(" | ") for row in rows), table.splitlines()[0]


def test_methods_side_by_side(tmp_path: Path):
    runs = [fake_run(tmp_path, "cmdr", "rgbxyz", "full", 0.95, "cmdr"), fake_run(tmp_path, "cfm", "rgbxyz", "full",
                                                                                  0.90, "cfm"),
            fake_run(tmp_path, "mafr", "rgbxyz", "full", 0.85, "mafr")]
    assert main(["--runs", *map(str, runs), "--out", str(tmp_path / "tables")]) == 0
    markdown = (tmp_path / "tables" / "tables.md").read_text()
    t1 = markdown.split("### Table 1")[1].split("###")[0]
    assert "| 2D+3D ours | 95.0 |" in t1, "CMDR-IAD's tables keep CMDR-IAD's run"
    means = markdown.split("### Methods side by side: mean")[1].split("###")[0]
    rows = [line.split(" | ")[0] for line in means.splitlines() if line.startswith("| ")][1:]
    assert [r for r in rows if r.endswith("(AUPRO 99 thr)")] == [
        f"| {m} 2D+3D ours (AUPRO 99 thr)" for m in ("CMDR-IAD", "CFM", "MAFR")]
    assert "| CFM 2D+3D paper | 95.4 | 99.3 | 97.1 | 45.5 |" in means
    assert "| MAFR 2D+3D paper | 97.2 | — | — | — |" in means
    assert "| CMDR-IAD 2D+3D paper | 97.3 |" in means
    per_class = markdown.split("### Methods side by side: I-AUROC per class")[1]
    assert "| CFM 2D+3D ours | 90.0 |" in per_class and "| CFM 2D+3D paper | 99.4 | 88.8 |" in per_class
    assert "| CFM 2D+3D Δ | -9.4 |" in per_class


def test_memory_bank_rows_and_single_memory_variants(tmp_path: Path):
    """BTF's three modalities and Shape-Guided's sdf_only / rgb_only variants land in their paper's 2D / 3D rows."""
    runs = [fake_run(tmp_path, "btf", "rgbxyz", "full", 0.86, "btf"), fake_run(tmp_path, "btf3", "xyz", "full", 0.78,
                                                                                "btf"),
            fake_run(tmp_path, "sg", "rgbxyz", "full", 0.94, "shape_guided"),
            fake_run(tmp_path, "sg3", "rgbxyz", "sdf_only", 0.91, "shape_guided"),
            fake_run(tmp_path, "sg2", "rgbxyz", "rgb_only", 0.81, "shape_guided")]
    assert main(["--runs", *map(str, runs), "--out", str(tmp_path / "tables")]) == 0
    means = (tmp_path / "tables" / "tables.md").read_text().split("### Methods side by side: mean")[1]
    for row in ("| BTF 2D+3D ours (AUPRO 99 thr) | 86.0 |", "| BTF 3D ours (AUPRO 99 thr) | 78.0 |",
                "| BTF 3D paper | 78.2 | — | 92.4 |", "| Shape-Guided 3D ours (AUPRO 99 thr) | 91.0 |",
                "| Shape-Guided 2D ours (AUPRO 99 thr) | 81.0 |", "| Shape-Guided 2D+3D paper | 94.7 | — | 97.6 |"):
        assert row in means, row


def test_missing_run_folder(tmp_path: Path):
    assert main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1


@pytest.mark.parametrize("modality", ["xyz"])
def test_a_second_run_of_the_same_row_replaces_the_first(tmp_path: Path, modality: str):
    runs = [fake_run(tmp_path, "a", modality, "full", 0.5), fake_run(tmp_path, "b", modality, "full", 0.6)]
    assert main(["--runs", *map(str, runs), "--out", str(tmp_path / "t")]) == 0
    assert "| 3D ours | 60.0 |" in (tmp_path / "t" / "tables.md").read_text()


@pytest.mark.parametrize("model", ["cmdr", "mafr", "btf", "shape_guided", "m3dm"])
def test_benchmark_writes_the_table4_keys(tmp_path: Path, model: str):
    import benchmark

    out = tmp_path / "b.json"
    quick = ["--model_option", "expert_steps=2"] if model == "shape_guided" else []
    assert benchmark.main(["--preset", "tiny", "--model", model, "--random_init", "--device", "cpu", *quick,
                           "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["model"] == model
    training = ("fit_seconds", "bank_megabytes") if model in ("btf", "shape_guided", "m3dm") else \
        ("train_epoch_seconds_cached", "train_epoch_seconds_uncached", "snapshot_seconds", "snapshot_megabytes")
    for key in ("fps", "peak_memory_mb", "predictor_seconds_per_part", *training):
        assert results[key] > 0
    assert set(results["stages"]) == {"load", "features", "method", "total"}
    assert set(results["branch_seconds"]) == {"rgb", "xyz"} and min(results["branch_seconds"].values()) > 0
    stages = results["stages"]  # the stages are consecutive clock readings: they add up to the total
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), rel=1e-6)
    roofline = results["roofline"]
    assert roofline["matmul_gflops_per_second"]["fp32"] > 0
    assert set(roofline["stages"]) == set(stages)
    assert roofline["stages"]["method"]["gflop"] > 0 and roofline["stages"]["load"]["gflop"] == 0
    total = roofline["stages"]["total"]["gflop"]
    assert total == pytest.approx(sum(s["gflop"] for k, s in roofline["stages"].items() if k != "total"))


def test_benchmark_batched_mode_reports_seconds_per_part(tmp_path: Path):
    import benchmark

    out = tmp_path / "b.json"
    assert benchmark.main(["--preset", "tiny", "--random_init", "--device", "cpu", "--batch_size", "3", "--out",
                           str(out)]) == 0
    results = json.loads(out.read_text())
    stages = results["stages"]
    assert results["batch_size"] == 3 and results["fps"] == pytest.approx(1 / stages["total"])
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), rel=1e-6)


def test_benchmark_train_memory(tmp_path: Path, capsys: pytest.CaptureFixture):
    """--train_memory measures a training step per batch size, with and without activation checkpointing, each in
    a fresh process; memory-bank methods are refused."""
    import benchmark

    out = tmp_path / "m.json"
    assert benchmark.main(["--preset", "tiny", "--train_memory", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["train_step_peak_memory_mb"]) == set(results["train_step_seconds"]) == {
        "batch_1", "batch_1_checkpointed", "batch_2", "batch_2_checkpointed"}
    assert all(peak > 100 for peak in results["train_step_peak_memory_mb"].values())  # a process with torch loaded
    assert all(seconds > 0 for seconds in results["train_step_seconds"].values())
    assert "batch size 2, activation checkpointing on: peak" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "tiny", "--model", "btf", "--train_memory"])


def test_flop_count_of_a_matrix_product():
    import torch

    from benchmark import count_flops

    result, flops = count_flops(torch.mm, torch.randn(64, 32), torch.randn(32, 16))
    assert result.shape == (64, 16) and flops == 2 * 64 * 32 * 16


def test_matmul_rate_keeps_to_its_time_budget(monkeypatch: pytest.MonkeyPatch):
    """An emulated dtype must not take minutes: with the budget spent, the operands stop growing at 256."""
    import torch

    import benchmark

    sizes = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: sizes.append(shape[0]) or real_randn(*shape, **kw))
    monkeypatch.setattr(benchmark, "MATMUL_BUDGET_SECONDS", 0.0)
    assert benchmark.matmul_rate(torch.device("cpu"), torch.float32) > 0
    assert set(sizes) == {256}
    sizes.clear()
    monkeypatch.setattr(benchmark, "MATMUL_BUDGET_SECONDS", math.inf)
    monkeypatch.setattr(benchmark, "MATMUL_SIZE", 512)
    benchmark.matmul_rate(torch.device("cpu"), torch.float32)
    assert sorted(set(sizes)) == [256, 512]
