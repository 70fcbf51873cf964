"""The paper's Table 8: detector × chunk size × contamination level, built, trained and evaluated in one command.

    python -m scans.sweep SCANS_DIR --out R [--detectors lof iso hybrid] [--chunk_sizes 4096 9216]
        [--levels low high] [--epochs_no 50] [--batch_size 4] [--preset paper|lite|tiny] [--random_init]
        [--pointmae_weights F] [--device auto|cpu|cuda]

Each configuration gets ``R/<detector>_<chunk>_<level>/`` (dataset, checkpoint, metrics); a configuration whose
metrics exist is skipped, so an interrupted sweep resumes. The table is written to ``R/table8.md`` and
``R/table8.csv`` (percent, one decimal).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

from networks.features import PRESETS
from scans import build_dataset, inference, train
from utils.data.io import write_text_atomic
from utils.runs.pipeline import setup_logging

logger = logging.getLogger("scans.sweep")
COLUMNS = ("I-AUROC", "P-AUROC", "AUPRO@30%", "n_test", "n_anomalous", "fps")


def _cell(key: str, value: object) -> str:
    if value is None:
        return "n/a"
    if key in ("I-AUROC", "P-AUROC", "AUPRO@30%"):
        return f"{100 * float(value):.1f}"
    return f"{float(value):.2f}" if key == "fps" else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--detectors", nargs="+", choices=build_dataset.DETECTORS, default=["lof", "iso", "hybrid"])
    parser.add_argument("--chunk_sizes", nargs="+", type=int, default=[4096, 9216])
    parser.add_argument("--levels", nargs="+", choices=tuple(build_dataset.CONTAMINATION), default=["low", "high"])
    parser.add_argument("--epochs_no", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--random_init", action="store_true")
    parser.add_argument("--pointmae_weights", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    setup_logging()
    model_args = ["--preset", args.preset, "--device", args.device]
    model_args += ["--random_init"] if args.random_init else []
    model_args += ["--pointmae_weights", str(args.pointmae_weights)] if args.pointmae_weights else []
    rows = []
    for detector in args.detectors:
        for chunk_size in args.chunk_sizes:
            for level in args.levels:
                name = f"{detector}_{chunk_size}_{level}"
                folder = args.out / name
                metrics_path = folder / "results" / "run" / "metrics.json"
                if not metrics_path.is_file():
                    logger.info("%s: building, training, evaluating", name)
                    steps = [
                        (build_dataset.main, [str(args.scans_dir), "--out", str(folder / "data"), "--detector",
                                              detector, "--level", level, "--chunk_size", str(chunk_size)]),
                        (train.main, ["--data", str(folder / "data"), "--checkpoint", str(folder / "decoder.pth"),
                                      "--epochs_no", str(args.epochs_no), "--batch_size", str(args.batch_size),
                                      *model_args]),
                        (inference.main, ["--data", str(folder / "data"), "--checkpoint", str(folder / "decoder.pth"),
                                          "--results_dir", str(folder / "results"), "--run_name", "run", *model_args]),
                    ]
                    for step, step_args in steps:
                        if step(step_args) != 0:
                            logger.error("%s failed; see the messages above", name)
                            return 1
                metrics = json.loads(metrics_path.read_text())
                rows.append([detector, str(chunk_size), level, *(_cell(c, metrics[c]) for c in COLUMNS)])
    header = ["detector", "chunk size", "level", *COLUMNS]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    write_text_atomic(args.out / "table8.md", "### Table 8: outlier detectors (percent)\n\n" + markdown + "\n")
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    write_text_atomic(args.out / "table8.csv", buffer.getvalue())
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
