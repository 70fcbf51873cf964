"""Every method of the harness on one real MVTec 3D-AD class, in one table (docs/real_data.md).

    python scripts/real_benchmark.py --dataset_path D --class_name C [--out results/real_<C>]
        [--seeds 115 1 2] [--rows NAME ...] [--epochs_no 20] [--batch_size 2] [--cache_dir cache/features]
        [--checkpoint_savepath checkpoints/real]

Each row of :data:`ROWS` is one configuration — a method, a preset, a modality and options — trained with every
seed of ``--seeds`` (memory-bank methods are fitted, deterministically, once) and evaluated on the class's test
split. Per run the metrics, the training (or fit) time and the scoring time go to ``<out>/runs/<row>_seed<S>.json``
as soon as the run ends, so rerunning the command after an interruption skips what is done (an interrupted
training continues from its saved state). After every run the table is rewritten: ``<out>/table.md`` (mean and
min–max over the seeds) and ``<out>/table.json``.

Parts per second count what a part costs on the line: its features computed from the files (measured once per
preset and modality on the first test parts, the cache off) plus the method's scoring of cached features. Works on
any class folder in the MVTec 3D-AD layout; rows whose modality the class cannot provide (no clouds) are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference import evaluate_class
from networks.features import PRESETS
from networks.methods.detector import MemoryBankDetector
from networks.methods.registry import detector_class
from scripts.compare_lite_3d import VARIANTS
from train import TrainingInterrupted, train_class
from utils.data.io import InputError, write_text_atomic
from utils.data.mvtec3d import collate_samples
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import RunConfig, open_split, prepare_run, setup_logging

logger = logging.getLogger("real_benchmark")

DEFAULT_SEEDS = (115, 1, 2)
FEATURE_TIMING_PARTS = 10  # test parts whose features are computed without the cache, for parts per second
METRICS = ("I-AUROC", "P-AUROC", "AUPRO@30%", "AUPRO@1%")


@dataclass(frozen=True)
class Row:
    """One configuration of the table: a method on a preset, or on one of scripts/compare_lite_3d.py's 3D-branch
    variants of ``lite`` (``variant``)."""

    name: str
    model: str
    preset: str = "lite"
    modality: str = "rgbxyz"
    options: tuple[str, ...] = ()
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.variant is not None:  # registered in this process only, as compare_lite_3d.py does
            object.__setattr__(self, "preset", f"compare_lite_3d_{self.variant}")
            PRESETS[self.preset] = VARIANTS[self.variant]

    @property
    def trained(self) -> bool:
        """Gradient-trained (one run per seed), not a memory bank fitted once."""
        return not issubclass(detector_class(self.model), MemoryBankDetector)


ROWS: tuple[Row, ...] = (
    Row("cmdr", "cmdr"),
    Row("cmdr_rgb", "cmdr", modality="rgb"),
    Row("cmdr_xyz", "cmdr", modality="xyz"),
    Row("cmdr_fpfh", "cmdr", preset="lite_fpfh"),
    Row("cfm", "cfm"),
    Row("cfm_fpfh", "cfm", preset="lite_fpfh"),
    Row("mafr", "mafr"),
    Row("mafr_fpfh", "mafr", preset="lite_fpfh"),
    Row("btf", "btf"),  # BTF reads FPFH with lite as its definition says: no lite_fpfh row
    Row("shape_guided", "shape_guided"),  # likewise
    Row("m3dm", "m3dm"),
    Row("m3dm_rgb", "m3dm", modality="rgb"),
    Row("m3dm_xyz", "m3dm", modality="xyz"),
    Row("m3dm_fpfh", "m3dm", preset="lite_fpfh"),
    Row("patchcore", "patchcore"),
    Row("patchcore_rgb", "patchcore", modality="rgb"),
    Row("patchcore_fpfh", "patchcore", preset="lite_fpfh"),
    # lite's 3D branch on real data (issue #27's question): normals (the rows above), normals + curvature,
    # normals + FPFH, FPFH (the _fpfh rows)
    Row("cmdr_curvature", "cmdr", variant="curvature"),
    Row("cmdr_geometry_fpfh", "cmdr", variant="geometry_fpfh"),
    Row("m3dm_curvature", "m3dm", variant="curvature"),
    Row("m3dm_geometry_fpfh", "m3dm", variant="geometry_fpfh"),
    Row("patchcore_curvature", "patchcore", variant="curvature"),
    Row("patchcore_geometry_fpfh", "patchcore", variant="geometry_fpfh"),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


@dataclass
class Benchmark:
    """The options shared by every run of the table."""

    dataset_path: Path
    class_name: str
    out: Path
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs_no: int = 20
    batch_size: int = 2
    cache_dir: Path | None = Path("cache/features")
    checkpoint_dir: Path = Path("checkpoints/real")
    feature_seconds: dict[str, float] = field(default_factory=dict)

    def config(self, row: Row, seed: int) -> RunConfig:
        return RunConfig(dataset_path=self.dataset_path, class_names=[self.class_name], model=row.model,
                         model_option=list(row.options), modality=row.modality, preset=row.preset,
                         epochs_no=self.epochs_no if row.trained else 1, batch_size=self.batch_size,
                         checkpoint_dir=self.checkpoint_dir / row.preset, cache_dir=self.cache_dir, seed=seed)

    def run_path(self, row: Row, seed: int | str) -> Path:
        """The record of ``row``'s run with ``seed``; ``seed="*"`` gives the pattern of every seed's record."""
        return self.out / "runs" / f"{row.name}_seed{seed}.json"


def feature_seconds(cache: FeatureCache, config: RunConfig) -> float:
    """Seconds per part of the frozen features computed from the files (no cache), over the first test parts."""
    dataset = open_split(cache.extractor, config.dataset_path, config.class_names[0], "test", config.modality)
    uncached = FeatureCache(cache.extractor, None)
    samples = [dataset[i] for i in range(min(FEATURE_TIMING_PARTS, len(dataset)))]
    uncached.features(collate_samples(samples[:1]))  # warm-up: first calls allocate
    start = time.perf_counter()
    for sample in samples:
        with torch.no_grad():
            uncached.features(collate_samples([sample]))
    return (time.perf_counter() - start) / len(samples)


def run(benchmark: Benchmark, row: Row, seed: int) -> dict:
    """Train (or fit) and evaluate one configuration with one seed; store and return its record."""
    config = benchmark.config(row, seed)
    _, cache = prepare_run(config)
    key = f"{row.preset}/{row.modality}"
    if key not in benchmark.feature_seconds:
        benchmark.feature_seconds[key] = feature_seconds(cache, config)
    start = time.perf_counter()
    train_class(benchmark.class_name, config, cache, resume=True)
    train_seconds = time.perf_counter() - start
    metrics = evaluate_class(benchmark.class_name, config, cache, "full", "input",
                             benchmark.out / "evaluations" / f"{row.name}_seed{seed}")
    record = {"row": row.name, "model": row.model, "preset": row.preset, "modality": row.modality,
              "options": list(row.options), "seed": seed, "config": config.to_dict(), "metrics": metrics,
              "train_seconds": train_seconds, "feature_seconds_per_part": benchmark.feature_seconds[key],
              "score_seconds_per_part": metrics["eval_seconds"] / metrics["n_test"]}
    write_text_atomic(benchmark.run_path(row, seed), json.dumps(record, indent=2) + "\n")
    return record


def summarise(records: list[dict]) -> dict:
    """Mean, min and max over seeds of the metrics and times of one row's records."""
    summary = {"seeds": [r["seed"] for r in records]}
    for key in METRICS:
        values = [r["metrics"][key] for r in records]
        summary[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
    summary["train_seconds"] = float(np.mean([r["train_seconds"] for r in records]))
    per_part = np.mean([r["feature_seconds_per_part"] + r["score_seconds_per_part"] for r in records])
    summary["parts_per_second"] = float(1 / per_part)
    return summary


def table_markdown(class_name: str, rows: dict[str, dict]) -> str:
    """The table: one line per row, metrics in percent as mean (min–max) over seeds."""
    lines = [f"| {class_name} | seeds | " + " | ".join(METRICS) + " | train / fit | parts/s |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    for name, summary in rows.items():
        cells = []
        for key in METRICS:
            value = summary[key]
            spread = f" ({100 * value['min']:.1f}–{100 * value['max']:.1f})" if len(summary["seeds"]) > 1 else ""
            cells.append(f"{100 * value['mean']:.1f}{spread}")
        minutes, seconds = divmod(round(summary["train_seconds"]), 60)
        lines.append(f"| {name} | {len(summary['seeds'])} | " + " | ".join(cells)
                     + f" | {minutes} min {seconds:02d} s | {summary['parts_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def write_table(benchmark: Benchmark, rows: tuple[Row, ...] | list[Row]) -> dict[str, dict]:
    """Summarise every finished run of ``rows`` (whichever invocation ran it) into table.md / table.json; returns
    the summaries."""
    summaries = {}
    order = list(dict.fromkeys((*benchmark.seeds, *DEFAULT_SEEDS)))  # this invocation's seeds first, then the rest
    for row in rows:
        pattern = benchmark.run_path(row, "*")
        records = [json.loads(p.read_text()) for p in pattern.parent.glob(pattern.name)]
        records.sort(key=lambda r: (order.index(r["seed"]), 0) if r["seed"] in order else (len(order), r["seed"]))
        if records:
            summaries[row.name] = {"model": row.model, "preset": row.preset, "modality": row.modality,
                                   "options": list(row.options), **summarise(records)}
    write_text_atomic(benchmark.out / "table.json", json.dumps(summaries, indent=2) + "\n")
    write_text_atomic(benchmark.out / "table.md", table_markdown(benchmark.class_name, summaries))
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", type=Path, required=True)
    parser.add_argument("--class_name", required=True)
    parser.add_argument("--out", type=Path, help="default: results/real_<class_name>")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds of the trained methods (the memory banks use the first)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS_BY_NAME), default=[r.name for r in ROWS],
                        help="which rows (default: all)")
    parser.add_argument("--epochs_no", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--cache_dir", type=Path, default=Path("cache/features"))
    parser.add_argument("--checkpoint_savepath", type=Path, default=Path("checkpoints/real"))
    args = parser.parse_args(argv)
    setup_logging()
    benchmark = Benchmark(args.dataset_path, args.class_name, args.out or Path("results") / f"real_{args.class_name}",
                          tuple(args.seeds), args.epochs_no, args.batch_size, args.cache_dir,
                          args.checkpoint_savepath)
    rows = [ROWS_BY_NAME[name] for name in args.rows]
    has_clouds = open_split_has_clouds(benchmark)
    skipped = [row.name for row in rows if row.modality != "rgb" and not has_clouds]
    if skipped:
        logger.warning("%s has no point clouds: skipping %s", args.class_name, ", ".join(skipped))
        rows = [row for row in rows if row.name not in skipped]
    runs = [(row, seed) for row in rows for seed in (benchmark.seeds if row.trained else benchmark.seeds[:1])]
    todo = [(row, seed) for row, seed in runs if not benchmark.run_path(row, seed).is_file()]
    logger.info("%d of %d runs to do (%s)", len(todo), len(runs), benchmark.out)
    try:
        for row, seed in tqdm(todo, desc="runs", unit="run"):
            record = run(benchmark, row, seed)
            logger.info("%s seed %d: I-AUROC %.3f  AUPRO@30%% %.3f  (train %.0f s)", row.name, seed,
                        record["metrics"]["I-AUROC"], record["metrics"]["AUPRO@30%"], record["train_seconds"])
            write_table(benchmark, ROWS)
    except InputError as err:
        logger.error("%s", err)
        return 1
    except TrainingInterrupted as err:
        logger.warning("%s. Continue with the same command", err)
        return 130
    print(table_markdown(args.class_name, write_table(benchmark, ROWS)))
    return 0


def open_split_has_clouds(benchmark: Benchmark) -> bool:
    """Whether the class's test split has point clouds (xyz/ folders)."""
    return any((d / "xyz").is_dir() for d in (benchmark.dataset_path / benchmark.class_name / "test").iterdir())


if __name__ == "__main__":
    sys.exit(main())
