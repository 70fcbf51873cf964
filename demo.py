"""The whole method on built-in synthetic data, in about a minute on a CPU.

    python demo.py [--out data/demo] [--classes dome] [--epochs_no 20]
        [--preset tiny|paper] [--rgb_weights F] [--pointmae_weights F] [--device auto|cpu|cuda]

1. generates a synthetic dataset in the MVTec 3D-AD layout (``utils.synthetic``),
2. trains CMDR-IAD, by default with the ``tiny`` preset (small, randomly initialised frozen backbones: no
   downloads),
3. runs inference, prints the metrics table and writes heatmap panels.

With the ``tiny`` preset the backbones are random, so the numbers say that the pipeline runs end to end, not how
well the method detects defects (README, "Quick start", says why). ``--preset paper`` with the pretrained DINO and
Point-MAE weights runs the same demo with the paper's extractors (a GPU is advisable).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import inference
import train
from networks.features import PRESETS
from utils.pipeline import setup_logging
from utils.synthetic import SyntheticConfig, generate_dataset

logger = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="working folder (data, cache, results)")
    parser.add_argument("--classes", nargs="+", default=["dome"], help="synthetic classes: dome, torus, box")
    parser.add_argument("--epochs_no", type=int, default=20)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: random backbones (always allowed here); paper: needs the pretrained weights")
    parser.add_argument("--rgb_weights", type=Path, help="ViT weights file (paper preset default: the timm hub)")
    parser.add_argument("--pointmae_weights", type=Path, help="Point-MAE weights file")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    setup_logging()

    # background "none": like MVTec 3D-AD after processing/preprocess_mvtec.py
    data = generate_dataset(args.out / "dataset", SyntheticConfig(classes=tuple(args.classes), background="none"))
    common = ["--dataset_path", str(data), "--preset", args.preset, "--epochs_no", str(args.epochs_no),
              "--cache_dir", str(args.out / "cache"), "--device", args.device]
    if args.preset == "tiny":  # the tiny preset has no pretrained weights: random ones, said in the log and metadata
        common.append("--random_init")
    common += [f"--{name}={value}" for name in ("rgb_weights", "pointmae_weights")
               if (value := getattr(args, name)) is not None]
    if train.main([*common, "--class_name", *args.classes,
                   "--checkpoint_savepath", str(args.out / "checkpoints" / args.preset)]) != 0:
        return 1
    run_name = f"{args.preset}_demo"
    status = inference.main([*common, "--class_names", *args.classes, "--checkpoint_folder",
                             str(args.out / "checkpoints" / args.preset), "--results_dir", str(args.out / "results"),
                             "--run_name", run_name, "--save_maps"])
    if status == 0:
        logger.info("open %s to see the heatmaps (RGB | depth | ground truth | anomaly map)",
                    args.out / "results" / run_name / "maps")
    return status


if __name__ == "__main__":
    sys.exit(main())
