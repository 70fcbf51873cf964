"""The whole method on built-in synthetic data, in about a minute on a CPU.

    python demo.py [--out data/demo] [--classes dome] [--epochs_no 20]

1. generates a synthetic dataset in the MVTec 3D-AD layout (``utils.synthetic``),
2. trains CMDR-IAD with the ``tiny`` preset (small, randomly initialised frozen backbones: no downloads),
3. runs inference, prints the metrics table and writes heatmap panels.

The backbones are random, so the numbers say that the pipeline runs end to end, not how well the method
detects defects: that needs the pretrained DINO and Point-MAE weights (README, "Real data").
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import inference
import train
from utils.pipeline import setup_logging
from utils.synthetic import SyntheticConfig, generate_dataset

logger = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="working folder (data, cache, results)")
    parser.add_argument("--classes", nargs="+", default=["dome"], help="synthetic classes: dome, torus, box")
    parser.add_argument("--epochs_no", type=int, default=20)
    args = parser.parse_args(argv)
    setup_logging()

    # background "none": like MVTec 3D-AD after processing/preprocess_mvtec.py
    data = generate_dataset(args.out / "dataset", SyntheticConfig(classes=tuple(args.classes), background="none"))
    common = ["--dataset_path", str(data), "--preset", "tiny", "--random_init", "--epochs_no", str(args.epochs_no),
              "--cache_dir", str(args.out / "cache")]
    if train.main([*common, "--class_name", *args.classes,
                   "--checkpoint_savepath", str(args.out / "checkpoints")]) != 0:
        return 1
    status = inference.main([*common, "--class_names", *args.classes, "--checkpoint_folder",
                             str(args.out / "checkpoints"), "--results_dir", str(args.out / "results"),
                             "--run_name", "tiny_demo", "--save_maps"])
    if status == 0:
        logger.info("open %s to see the heatmaps (RGB | depth | ground truth | anomaly map)",
                    args.out / "results" / "tiny_demo" / "maps")
    return status


if __name__ == "__main__":
    sys.exit(main())
