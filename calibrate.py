"""Fit a trained run's pass/fail threshold (docs/inspecting.md, "Calibration").

    python calibrate.py --checkpoint_folder RUN --class_name C [C ...] --dataset_path D
        [--false_alarm_rate 0.01 | --miss_rate R] [--rule tail|empirical] [--epochs_no E] [--batch_size B]
        [--device auto|cpu|cuda]

``RUN`` is the run folder train.py wrote (``<savepath>/<model>_<modality>_seed<seed>``, or ``<savepath>`` for
CMDR-IAD's default run). The parts of ``<D>/<class>/validation/good`` (MVTec 3D-AD provides this split for exactly
this) are scored. By default the threshold is the score a good part exceeds with the target false-alarm rate under
a log-normal tail fitted robustly to those scores (``--rule tail``; ``empirical``: the smallest score that at most
``floor(rate · n)`` of them exceed — with fewer than 1 / rate good parts that is their maximum, which one outlier
decides). ``--miss_rate R`` chooses the operating point by the defective parts of the test split instead: the
largest threshold that misses at most that share of them. It is stored with the run
(``<class>_independent_<E>ep_<B>bs.threshold.json``), where ``predict.py`` and the predictor find it. When the class
has a test split, the miss rate (anomalous test parts at or below the threshold) and the false-alarm rate on its
good test parts are reported and stored too.
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
from utils.evaluation.metrics import threshold_decisions
from utils.runs.pipeline import setup_logging, xyz_policy
from utils.station.calibration import (
    DEFAULT_FALSE_ALARM_RATE, DEFAULT_RULE, MIN_TAIL_PARTS, RULES, GoodTail, calibrate_threshold, miss_rate_threshold,
    resolvable_rate,
)
from utils.station.predictor import Predictor, add_run_arguments

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


def calibrate_class(predictor: Predictor, dataset_path: Path, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                    rule: str = DEFAULT_RULE, miss_rate: float | None = None) -> dict:
    """The threshold (on validation/good, or by ``miss_rate`` on the test split's defective parts), stored with the
    run; the test split's miss and false-alarm rates."""
    good, _, peak = score_split(predictor, dataset_path, "validation")
    has_test = (Path(dataset_path) / predictor.class_name / "test").is_dir()
    scores, labels = score_split(predictor, dataset_path, "test")[:2] if has_test else (np.array([]), np.array([]))
    calibration = {"rule": rule, "false_alarm_rate_target": false_alarm_rate, "n_validation": len(good),
                   "map_scale": peak, "dataset_path": str(dataset_path),
                   "resolvable_false_alarm_rate": resolvable_rate(len(good))}
    tail = GoodTail.fit(good) if len(good) >= MIN_TAIL_PARTS and good.min() > 0 else None
    if tail is not None:
        calibration["tail"] = {"location": tail.location, "scale": tail.scale}
    if miss_rate is not None:
        defective = scores[labels == 1]
        if not defective.size:
            raise InputError(f"{Path(dataset_path) / predictor.class_name / 'test'}: --miss_rate needs defective "
                             "parts in the test split (prepare_parts.py --defective DIR puts them there)")
        threshold = miss_rate_threshold(defective, miss_rate)
        calibration.update(rule="miss_rate", miss_rate_target=miss_rate, n_defective=int(defective.size))
        calibration.pop("false_alarm_rate_target")
    else:
        threshold = calibrate_threshold(good, false_alarm_rate, rule)
        if rule == "tail" and tail is None:
            calibration["rule"] = "empirical"
            logger.warning("%s: %d good validation parts: fewer than the %d a tail needs; the threshold is the "
                           "empirical one", predictor.class_name, len(good), MIN_TAIL_PARTS)
        elif false_alarm_rate < resolvable_rate(len(good)):
            logger.warning("%s: %d good parts resolve false-alarm rates down to %.3g; the target %.3g %s",
                           predictor.class_name, len(good), resolvable_rate(len(good)), false_alarm_rate,
                           "is extrapolated by the fitted tail" if calibration["rule"] == "tail" else
                           "gives their largest score (one outlier decides it: --rule tail estimates the tail)")
    calibration["threshold"] = threshold
    calibration["validation_false_alarm_rate"] = float(np.mean(good > threshold))
    if tail is not None:
        calibration["expected_false_alarm_rate"] = tail.false_alarm_rate(threshold)
    if has_test:
        calibration["test"] = threshold_decisions(threshold, scores, labels)
    path = predictor.save_calibration(calibration)
    target = (f"miss rate {miss_rate:.3g} on {calibration['n_defective']} defective parts" if miss_rate is not None
              else f"{calibration['rule']} rule, false-alarm rate {false_alarm_rate:.3g}")
    logger.info("%s: threshold %.6g (%s; %d good validation parts, %.1f %% of them above it) written to %s",
                predictor.class_name, threshold, target, len(good),
                100 * calibration["validation_false_alarm_rate"], path)
    if "test" in calibration:
        test = calibration["test"]
        logger.info("%s test split: miss rate %s of %d anomalous parts, false alarms %s of %d good parts",
                    predictor.class_name, _rate(test["miss_rate"]), test["n_defective"],
                    _rate(test["false_alarm_rate"]), test["n_good"])
    return calibration


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--class_name", "--class_names", dest="class_names", nargs="+", required=True)
    parser.add_argument("--dataset_path", type=Path, required=True, help="dataset root with <class>/validation/good")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--false_alarm_rate", type=float, default=DEFAULT_FALSE_ALARM_RATE,
                        help="share of good parts called anomalous (default 0.01)")
    target.add_argument("--miss_rate", type=float,
                        help="choose the threshold by the test split's defective parts instead: the share of them "
                             "called good")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                        help="tail: a log-normal tail fitted robustly to the good scores (default); empirical: the "
                             "score at most floor(rate · n) good parts exceed")
    args = parser.parse_args(argv)
    for flag in ("false_alarm_rate", "miss_rate"):
        if (value := getattr(args, flag)) is not None and not 0 <= value < 1:
            parser.error(f"--{flag} must be in [0, 1)")
    setup_logging()
    try:
        for class_name in args.class_names:
            predictor = Predictor.load(args.checkpoint_folder, class_name, args.device, args.epochs_no,
                                       args.batch_size)
            calibrate_class(predictor, args.dataset_path, args.false_alarm_rate, args.rule, args.miss_rate)
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
