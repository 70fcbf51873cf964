"""Fit a trained run's pass/fail threshold on good parts (docs/inspecting.md).

    python calibrate.py --checkpoint_folder RUN --class_name C [C ...] --dataset_path D
        [--false_alarm_rate 0.01] [--epochs_no E] [--batch_size B] [--device auto|cpu|cuda]

``RUN`` is the run folder train.py wrote (``<savepath>/<model>_<modality>_seed<seed>``, or ``<savepath>`` for
CMDR-IAD's default run). The parts of ``<D>/<class>/validation/good`` (MVTec 3D-AD provides this split for exactly
this) are scored; the threshold is the smallest of their scores that at most ``floor(rate · n)`` of them exceed.
It is stored with the run (``<class>_independent_<E>ep_<B>bs.threshold.json``), where ``predict.py`` and the
predictor find it. When the class has a test split, the expected miss rate (anomalous test parts at or below the
threshold) and the false-alarm rate on its good test parts are reported and stored too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data.io import InputError
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.runs.pipeline import setup_logging, xyz_policy
from utils.station.predictor import DEFAULT_FALSE_ALARM_RATE, Predictor, add_run_arguments, calibrate_threshold

logger = logging.getLogger("calibrate")


def score_split(predictor: Predictor, dataset_path: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Image scores and labels of a split of the predictor's class, and the largest map value."""
    extractor = predictor.extractor
    dataset = MVTec3DDataset(dataset_path, predictor.class_name, split, extractor.img_size,
                             xyz_policy(predictor.model.modality), extractor.config.normalization)
    scores, peak = [], 0.0
    for index in tqdm(range(len(dataset)), desc=f"{predictor.class_name} {split}", unit="part", leave=False):
        image_scores, maps = predictor.score_batch(collate_samples([dataset[index]]))
        scores.append(float(image_scores[0]))
        peak = max(peak, float(maps.max()))
    return np.array(scores), np.array(dataset.labels), peak


def calibrate_class(predictor: Predictor, dataset_path: Path, false_alarm_rate: float) -> dict:
    """Threshold on validation/good, stored with the run; the test split's miss and false-alarm rates."""
    good, _, peak = score_split(predictor, dataset_path, "validation")
    threshold = calibrate_threshold(good, false_alarm_rate)
    calibration = {"threshold": threshold, "false_alarm_rate_target": false_alarm_rate, "n_validation": len(good),
                   "validation_false_alarm_rate": float(np.mean(good > threshold)),
                   "map_scale": peak, "dataset_path": str(dataset_path)}
    if (Path(dataset_path) / predictor.class_name / "test").is_dir():
        scores, labels, _ = score_split(predictor, dataset_path, "test")
        anomalous, normal = scores[labels == 1], scores[labels == 0]
        calibration["test"] = {
            "n_anomalous": int(anomalous.size), "n_good": int(normal.size),
            "miss_rate": float(np.mean(anomalous <= threshold)) if anomalous.size else None,
            "false_alarm_rate": float(np.mean(normal > threshold)) if normal.size else None,
        }
    path = predictor.save_calibration(calibration)
    logger.info("%s: threshold %.6g (%d good parts, target false-alarm rate %.3g) written to %s",
                predictor.class_name, threshold, len(good), false_alarm_rate, path)
    if "test" in calibration:
        test = calibration["test"]
        logger.info("%s test split: miss rate %s of %d anomalous parts, false alarms %s of %d good parts",
                    predictor.class_name, _rate(test["miss_rate"]), test["n_anomalous"],
                    _rate(test["false_alarm_rate"]), test["n_good"])
    return calibration


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--class_name", "--class_names", dest="class_names", nargs="+", required=True)
    parser.add_argument("--dataset_path", type=Path, required=True, help="dataset root with <class>/validation/good")
    parser.add_argument("--false_alarm_rate", type=float, default=DEFAULT_FALSE_ALARM_RATE,
                        help="largest share of good parts called anomalous (default 0.01)")
    args = parser.parse_args(argv)
    if not 0 <= args.false_alarm_rate < 1:
        parser.error("--false_alarm_rate must be in [0, 1)")
    setup_logging()
    try:
        for class_name in args.class_names:
            predictor = Predictor.load(args.checkpoint_folder, class_name, args.device, args.epochs_no,
                                       args.batch_size)
            calibrate_class(predictor, args.dataset_path, args.false_alarm_rate)
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
