"""Anomaly detection metrics (docs/metrics.md): AUPRO in two protocols, I-AUROC and P-AUROC.

* :func:`calculate_au_pro` with ``num_thresholds=None`` computes the exact per-region-overlap curve of the
  official MVTec 3D-AD evaluation (ties merged, 8-connected regions); with an integer it computes the sampled
  curve of the reference code and the paper's tables (99 thresholds), whose AUPRO@1% is far lower than the
  exact value because its FPR grid is ~0.0102 wide.
* :func:`class_metrics` turns one class's test outputs into the metrics dict of the result files.

Every function takes plain numpy arrays and returns numbers or dicts; nothing here knows about models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

AUPRO_LIMITS = (0.3, 0.1, 0.05, 0.01)
PAPER_NUM_THRESHOLDS = 99
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def aupro_key(limit: float, num_thresholds: int | None = None) -> str:
    """Result key of an AUPRO value: ``AUPRO@30%`` (exact) or ``AUPRO@30% (99 thr)`` (sampled)."""
    key = f"AUPRO@{100 * limit:g}%"
    return key if num_thresholds is None else f"{key} ({num_thresholds} thr)"


METRIC_KEYS = (
    "I-AUROC",
    "P-AUROC",
    *(aupro_key(limit) for limit in AUPRO_LIMITS),
    *(aupro_key(limit, PAPER_NUM_THRESHOLDS) for limit in AUPRO_LIMITS),
)
"""The score keys of a class's metrics dict, in table order."""
PER_DEFECT_KEY = "I-AUROC per defect type"
"""Key of a class's {defect type: I-AUROC against the good samples} in metrics.json."""


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the piecewise-linear curve (x, y) from x[0] to ``x_max`` (official MVTec rule).

    Args:
        x: ascending x coordinates (repeated values allowed).
        y: y coordinates.
        x_max: upper integration limit; the curve is linearly interpolated at ``x_max``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        logger.warning("trapezoid: %d non-finite curve points ignored", int((~finite).sum()))
        x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            ins = int(np.searchsorted(x, x_max, side="right"))  # bisect_right
            if not 0 < ins < len(x):
                raise ValueError(f"integration limit {x_max} outside the curve's range [{x[0]}, {x[-1]}]")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _binary(gt: np.ndarray) -> np.ndarray:
    """A gt mask as bool: any non-zero value (255, 1, True) is anomalous."""
    return np.asarray(gt) > 0


def _check_inputs(gts: Sequence[np.ndarray], predictions: Sequence[np.ndarray]) -> None:
    if len(gts) != len(predictions) or len(gts) == 0:
        raise ValueError(f"need the same non-zero number of gts and predictions, got {len(gts)} and {len(predictions)}")
    for i, (gt, prediction) in enumerate(zip(gts, predictions)):
        if np.shape(gt) != np.shape(prediction) or np.ndim(gt) != 2:
            raise ValueError(f"sample {i}: gt {np.shape(gt)} and prediction {np.shape(prediction)} must be equal 2-D")
        if not np.isfinite(prediction).all():
            raise ValueError(f"sample {i}: prediction contains NaN or inf")


def _regions(gts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-pixel region weights of all images, flattened and concatenated.

    Returns:
        (ok: bool (N,), weight: float64 (N,) = 1 / |region| inside a region else 0, n_ok, n_regions)
    """
    ok_parts, weight_parts, n_regions = [], [], 0
    for gt in gts:
        labels, n_components = ndimage.label(_binary(gt), structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n_components + 1).astype(np.float64)
        inverse = np.zeros_like(sizes)
        inverse[1:] = 1.0 / sizes[1:]
        ok_parts.append(labels.ravel() == 0)
        weight_parts.append(inverse[labels.ravel()])
        n_regions += n_components
    ok = np.concatenate(ok_parts)
    return ok, np.concatenate(weight_parts), int(ok.sum()), n_regions


def _exact_pro_curve(scores: np.ndarray, ok: np.ndarray, weight: np.ndarray, n_ok: int, n_regions: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The official curve: one point per distinct score, from the highest score down."""
    order = np.argsort(scores)[::-1]  # the order inside a tie run is irrelevant: ties are merged below
    sorted_scores = scores[order]
    fprs = np.cumsum(ok[order], dtype=np.float64) / n_ok
    pros = np.cumsum(weight[order]) / n_regions
    last_of_tie = np.append(np.diff(sorted_scores) != 0, True)  # keep only the last point of each tie run
    fprs, pros = np.clip(fprs[last_of_tie], None, 1.0), np.clip(pros[last_of_tie], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def _sampled_pro_curve(scores: np.ndarray, ok: np.ndarray, weight: np.ndarray, n_ok: int, n_regions: int,
                       num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's sampled curve: thresholds at evenly spaced ranks of the OK pixels' scores."""
    positions = np.linspace(0, n_ok - 1, num_thresholds).astype(int)
    # np.partition puts the exact order statistics at ``positions`` without sorting everything
    thresholds = np.partition(scores[ok], np.unique(positions))[positions]
    fprs = 1.0 - (positions + 1) / n_ok
    # pixel i exceeds threshold j  <=>  j < exceeded[i] (thresholds are non-decreasing)
    anomalous = ~ok
    exceeded = np.searchsorted(thresholds, scores[anomalous], side="left")
    per_count = np.bincount(exceeded, weights=weight[anomalous], minlength=num_thresholds + 1)
    pros = np.cumsum(per_count[::-1])[::-1][1:] / n_regions  # pros[j] = sum of weights with exceeded > j
    fprs = np.concatenate(([1.0], fprs))[::-1]
    pros = np.concatenate(([1.0], pros))[::-1]
    return fprs, pros


def calculate_au_pro(
    gts: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    integration_limit: float | Sequence[float] = AUPRO_LIMITS,
    num_thresholds: int | None = None,
) -> tuple[list[float], tuple[np.ndarray, np.ndarray]]:
    """Area under the per-region-overlap curve, normalised by the integration limit.

    Args:
        gts: ground-truth masks, each 2-D (0/255, 0/1 or bool; any non-zero value is anomalous).
        predictions: anomaly maps of the same shapes (images may differ in size from each other).
        integration_limit: FPR limit(s) to integrate up to.
        num_thresholds: ``None`` for the exact official curve, an integer (the paper: 99) for the sampled protocol.

    Returns:
        (AUPRO per limit, (fprs, pros)); AUPRO values are NaN, with a warning, when there is no anomalous
        region or no OK pixel.
    """
    limits = [integration_limit] if np.isscalar(integration_limit) else list(integration_limit)
    _check_inputs(gts, predictions)
    ok, weight, n_ok, n_regions = _regions(gts)
    if n_regions == 0 or n_ok == 0:
        logger.warning("AUPRO undefined: %s; returning NaN", "no anomalous pixel" if n_regions == 0 else "no OK pixel")
        return [math.nan] * len(limits), (np.array([0.0, 1.0]), np.array([math.nan, math.nan]))
    scores = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in predictions])
    if num_thresholds is None:
        fprs, pros = _exact_pro_curve(scores, ok, weight, n_ok, n_regions)
    else:
        fprs, pros = _sampled_pro_curve(scores, ok, weight, n_ok, n_regions, num_thresholds)
    return [trapezoid(fprs, pros, x_max=limit) / limit for limit in limits], (fprs, pros)


def _auroc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
    if len(np.unique(labels)) < 2:
        logger.warning("%s undefined: only one class present in the labels; returning NaN", what)
        return math.nan
    return float(roc_auc_score(labels, scores))


def image_auroc(labels: Sequence[int], image_scores: Sequence[float]) -> float:
    """I-AUROC: ROC-AUC of per-image scores against 0/1 labels (NaN when only one label occurs)."""
    return _auroc(np.asarray(labels), np.asarray(image_scores, dtype=np.float64), "I-AUROC")


def image_auroc_per_defect(defect_types: Sequence[str], labels: Sequence[int],
                           image_scores: Sequence[float]) -> dict[str, float]:
    """I-AUROC of each defect type against the good samples (label 0): defect type → ROC-AUC, sorted by name."""
    defect_types, labels = np.asarray(defect_types), np.asarray(labels)
    scores = np.asarray(image_scores, dtype=np.float64)
    good = labels == 0
    return {defect: image_auroc(labels[good | (defect_types == defect)], scores[good | (defect_types == defect)])
            for defect in sorted(set(defect_types[~good].tolist()))}


def pixel_auroc(gts: Sequence[np.ndarray], pixel_scores: Sequence[np.ndarray]) -> float:
    """P-AUROC: ROC-AUC over all pixels of all images (NaN when no pixel, or every pixel, is anomalous)."""
    _check_inputs(gts, pixel_scores)
    labels = np.concatenate([_binary(g).ravel() for g in gts])
    scores = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in pixel_scores])
    return _auroc(labels, scores, "P-AUROC")


def class_metrics(
    labels: Sequence[int],
    image_scores: Sequence[float],
    gts: Sequence[np.ndarray],
    aupro_maps: Sequence[np.ndarray],
    pixel_scores: Sequence[np.ndarray],
    seconds: float | None = None,
    curves: dict | None = None,
) -> dict[str, float | int | None]:
    """All metrics of one class's test set, as fractions in [0, 1] (the per-class dict of metrics.json).

    Args:
        labels: per-image 0/1 labels.
        image_scores: per-image anomaly scores (for I-AUROC).
        gts: per-image 2-D gt masks.
        aupro_maps: per-image maps normalised for AUPRO.
        pixel_scores: per-image maps normalised for P-AUROC.
        seconds: wall-clock seconds of inference.py's scoring loop for the class (features read from the cache when
            it is warm, computed and stored when it is cold; then the method, fusion and normalisation), for
            ``eval_seconds`` and ``eval_samples_per_second``. Not the paper's FPS: ``benchmark.py`` measures that
            (the whole pipeline without cache).
        curves: a dict that receives ``"pro"``: the exact PRO curve (fprs, pros) behind the AUPRO values (the
            report draws it).
    """
    metrics: dict[str, float | int | None] = {
        "I-AUROC": image_auroc(labels, image_scores),
        "P-AUROC": pixel_auroc(gts, pixel_scores),
    }
    for num_thresholds in (None, PAPER_NUM_THRESHOLDS):
        values, curve = calculate_au_pro(gts, aupro_maps, AUPRO_LIMITS, num_thresholds)
        if curves is not None and num_thresholds is None:
            curves["pro"] = curve
        metrics.update({aupro_key(limit, num_thresholds): v for limit, v in zip(AUPRO_LIMITS, values)})
    metrics["n_test"] = len(labels)
    metrics["n_anomalous"] = int(np.sum(labels))
    metrics["eval_seconds"] = seconds
    metrics["eval_samples_per_second"] = len(labels) / seconds if seconds else None
    return metrics


def mean_metrics(per_class: dict[str, dict[str, float | int | None]]) -> dict[str, float]:
    """Mean over classes of every score key (NaN if any class's value is NaN or missing) and of the evaluation
    speed."""
    means = {}
    for key in (*METRIC_KEYS, "eval_samples_per_second"):
        values = [per_class[c].get(key) for c in per_class]
        means[key] = math.nan if any(v is None for v in values) else float(np.mean(values))
    return means


def threshold_decisions(threshold: float, scores: np.ndarray | list[float], labels: np.ndarray | list[int]) -> dict:
    """Counts and rates of the decisions (anomalous when score > threshold) against 0/1 labels: the confusion table
    (true/false positives and negatives), miss rate (defective called good) and false-alarm rate (good called
    anomalous); a rate is None without parts of its kind."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    flagged = scores > threshold
    good, defective = labels == 0, labels == 1
    counts = {"true_positives": int(np.sum(flagged & defective)), "false_negatives": int(np.sum(~flagged & defective)),
              "false_positives": int(np.sum(flagged & good)), "true_negatives": int(np.sum(~flagged & good))}
    n_defective, n_good = int(defective.sum()), int(good.sum())
    return {**counts, "n_defective": n_defective, "n_good": n_good,
            "miss_rate": counts["false_negatives"] / n_defective if n_defective else None,
            "false_alarm_rate": counts["false_positives"] / n_good if n_good else None}
