"""The report's pictures of a class (docs/inspecting.md, "The report"): where good and defective scores lie and
where the threshold cuts, the ROC curve with the operating point, the PRO curve up to 30 % FPR.

Plain functions that write one PNG each (matplotlib, no display needed); the numbers the report prints beside them
come from the same arrays (:func:`utils.evaluation.metrics.threshold_decisions`, the metrics), so a caption and
its picture cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever the machine has

import matplotlib.pyplot as plt  # noqa: E402 - after the backend
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from utils.data.io import atomic_path  # noqa: E402

GOOD_COLOUR, DEFECTIVE_COLOUR, THRESHOLD_COLOUR = "#2a7f2a", "#b22222", "#222222"
SIZE = (5.0, 3.2)  # inches at 100 dpi: 500 × 320 pixels
DPI = 100


def _save(figure: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def score_distribution(path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float | None,
                       title: str = "") -> Path:
    """Good and defective parts' image scores as two rows of dots (one per part, jittered apart) with the threshold
    as a vertical line and the counts on each side of it."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    figure, axes = plt.subplots(figsize=SIZE)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=scores.size)
    # what the parts on each side of the threshold are, per row: (score <= t, score > t)
    sides = {0: ("passed", "false alarms"), 1: ("missed", "flagged")}
    for row, (label, colour) in enumerate(((0, GOOD_COLOUR), (1, DEFECTIVE_COLOUR))):
        chosen = labels == label
        axes.scatter(scores[chosen], row + jitter[chosen], s=16, color=colour, alpha=0.8, edgecolors="none")
        if threshold is not None:
            above = int(np.sum(scores[chosen] > threshold))
            below = int(chosen.sum()) - above
            axes.annotate(f"{below} {sides[label][0]} (≤ t)", (0.01, row + 0.3), xycoords=("axes fraction", "data"),
                          color=colour, fontsize=8)
            axes.annotate(f"{above} {sides[label][1]} (> t)", (0.99, row + 0.3),
                          xycoords=("axes fraction", "data"), color=colour, fontsize=8, ha="right")
    if threshold is not None:
        axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1)
        axes.annotate("threshold t", (threshold, 1.5), color=THRESHOLD_COLOUR, fontsize=8, ha="center")
    axes.set_yticks([0, 1], ["good", "defective"])
    axes.set_ylim(-0.5, 1.6)
    axes.set_xlabel("image anomaly score")
    axes.set_title(title, fontsize=9)
    return _save(figure, path)


def roc_with_operating_point(path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float | None,
                             title: str = "") -> Path:
    """The image-level ROC curve, the threshold's (false-alarm rate, detection rate) marked on it."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = plt.subplots(figsize=(3.4, 3.2))
    axes.plot(fpr, tpr, color=DEFECTIVE_COLOUR, linewidth=1.5, drawstyle="steps-post")
    axes.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
    if threshold is not None:
        point = (np.mean(scores[labels == 0] > threshold), np.mean(scores[labels == 1] > threshold))
        axes.plot(*point, marker="o", color=THRESHOLD_COLOUR, markersize=6)
    axes.set_xlabel("false-alarm rate (good parts flagged)")
    axes.set_ylabel("detection rate")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title, fontsize=9)
    return _save(figure, path)


def pro_curve(path: Path, fprs: np.ndarray, pros: np.ndarray, limit: float = 0.3, title: str = "") -> Path:
    """The per-region-overlap curve up to the pixel false-positive rate ``limit`` (the AUPRO integration range)."""
    fprs, pros = np.asarray(fprs, dtype=np.float64), np.asarray(pros, dtype=np.float64)
    inside = fprs <= limit
    x, y = np.append(fprs[inside], limit), np.append(pros[inside], np.interp(limit, fprs, pros))  # up to the limit
    figure, axes = plt.subplots(figsize=(3.4, 3.2))
    axes.plot(x, y, color=DEFECTIVE_COLOUR, linewidth=1.5)
    axes.set_xlabel("pixel false-positive rate")
    axes.set_ylabel("per-region overlap")
    axes.set_xlim(0, limit)
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title, fontsize=9)
    return _save(figure, path)
