"""Metrics against brute-force implementations written from their definitions, and the result files."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from utils.data.io import atomic_path
from utils.evaluation.metrics import (
    AUPRO_LIMITS, METRIC_KEYS, PAPER_NUM_THRESHOLDS, aupro_key, calculate_au_pro, class_metrics, image_auroc,
    image_auroc_per_defect, pixel_auroc, trapezoid,
)
from utils.evaluation.results import write_results
from utils.data.transforms import mask_to_tensor, to_native_resolution

# --- brute-force references ------------------------------------------------------------------------------------------


def brute_regions(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected components by flood fill."""
    seen: set[tuple[int, int]] = set()
    regions = []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        region, stack = set(), [start]
        while stack:
            y, x = stack.pop()
            if (y, x) in seen or not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or not mask[y, x]:
                continue
            seen.add((y, x))
            region.add((y, x))
            stack += [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        regions.append(region)
    return regions


def brute_pixels(gts, predictions):
    """(score, is_ok) of every pixel and the regions as lists of scores."""
    pixels, regions = [], []
    for gt, pred in zip(gts, predictions):
        mask = np.asarray(gt) > 0
        pixels += [(float(pred[y, x]), not mask[y, x]) for y in range(mask.shape[0]) for x in range(mask.shape[1])]
        regions += [[float(pred[p]) for p in region] for region in brute_regions(mask)]
    return pixels, regions


def brute_exact_curve(gts, predictions):
    """One point per distinct threshold t, scores >= t counted as positive, from the highest t down."""
    pixels, regions = brute_pixels(gts, predictions)
    n_ok = sum(ok for _, ok in pixels)
    fprs, pros = [0.0], [0.0]
    for t in sorted({s for s, _ in pixels}, reverse=True):
        fprs.append(sum(ok and s >= t for s, ok in pixels) / n_ok)
        pros.append(np.mean([np.mean([s >= t for s in region]) for region in regions]))
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


def brute_sampled_curve(gts, predictions, num_thresholds):
    """The sampled protocol, literally as data_and_metrics.md §4 states it."""
    pixels, regions = brute_pixels(gts, predictions)
    ok_scores = sorted(s for s, ok in pixels if ok)
    n_ok = len(ok_scores)
    curve = [(1.0, 1.0)]
    for p in np.linspace(0, n_ok - 1, num_thresholds).astype(int):
        threshold = ok_scores[p]
        pro = np.mean([np.mean([s > threshold for s in region]) for region in regions])
        curve.append((1 - (p + 1) / n_ok, pro))
    curve.reverse()
    return np.array([c[0] for c in curve]), np.array([c[1] for c in curve])


def brute_area(x, y, x_max):
    """Integral of the piecewise-linear curve over [x[0], x_max], segment by segment."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if x0 >= x_max or x1 == x0:
            continue
        end = min(x1, x_max)
        y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_end) * (end - x0)
    return area


def brute_auroc(labels, scores):
    """Mann-Whitney: P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def random_case(seed: int, sizes=((7, 8), (6, 9), (7, 8)), levels: int | None = None):
    """Small gts with several regions (some touching only diagonally) and maps with or without ties."""
    rng = np.random.default_rng(seed)
    gts, predictions = [], []
    for shape in sizes:
        gt = (rng.random(shape) < 0.25).astype(np.uint8) * 255
        score = rng.random(shape) + 0.6 * (gt > 0)
        predictions.append(np.floor(score * levels) / levels if levels else score)
        gts.append(gt)
    gts[1][:] = 0  # an image without anomaly
    return gts, predictions


# --- AUPRO -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [None, 4, 1])  # continuous scores, heavy ties, everything tied
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_curve_and_aupro_match_brute_force(seed: int, levels: int | None):
    gts, predictions = random_case(seed, levels=levels)
    values, (fprs, pros) = calculate_au_pro(gts, predictions)
    expected_fprs, expected_pros = brute_exact_curve(gts, predictions)
    np.testing.assert_allclose(fprs, expected_fprs, atol=1e-12)
    np.testing.assert_allclose(pros, expected_pros, atol=1e-12)
    for limit, value in zip(AUPRO_LIMITS, values):
        assert value == pytest.approx(brute_area(expected_fprs, expected_pros, limit) / limit, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("num_thresholds", [99, 7])
def test_sampled_curve_matches_its_literal_definition(num_thresholds: int, levels: int | None):
    gts, predictions = random_case(2, levels=levels)
    values, (fprs, pros) = calculate_au_pro(gts, predictions, num_thresholds=num_thresholds)
    expected_fprs, expected_pros = brute_sampled_curve(gts, predictions, num_thresholds)
    np.testing.assert_allclose(fprs, expected_fprs, atol=1e-12)
    np.testing.assert_allclose(pros, expected_pros, atol=1e-12)
    for limit, value in zip(AUPRO_LIMITS, values):
        assert value == pytest.approx(brute_area(expected_fprs, expected_pros, limit) / limit, abs=1e-12)


def test_paper_protocol_under_reports_aupro_at_one_percent():
    """With 99 thresholds the FPR grid is ~0.0102 wide, so AUPRO@1% is a single trapezoid from FPR 0."""
    rng = np.random.default_rng(0)
    gts, predictions = [], []
    for _ in range(12):
        gt = np.zeros((64, 64), dtype=bool)
        y, x = rng.integers(0, 48, 2)
        gt[y : y + 12, x : x + 12] = True
        gts.append(gt)
        predictions.append(gt * 2.0 + rng.normal(0, 0.5, gt.shape))
    exact, _ = calculate_au_pro(gts, predictions, [0.3, 0.01])
    sampled, _ = calculate_au_pro(gts, predictions, [0.3, 0.01], num_thresholds=PAPER_NUM_THRESHOLDS)
    assert abs(exact[0] - sampled[0]) < 0.02  # the protocols agree where the grid is fine enough
    assert sampled[1] < exact[1] - 0.25


def test_gt_encodings_give_identical_results():
    gts, predictions = random_case(3)
    reference, _ = calculate_au_pro(gts, predictions)
    for encode in (lambda g: g > 0, lambda g: (g > 0).astype(np.uint8), lambda g: (g > 0).astype(np.float32)):
        assert calculate_au_pro([encode(g) for g in gts], predictions)[0] == reference


def test_all_zero_maps():
    gts, predictions = random_case(4)
    zeros = [np.zeros_like(p) for p in predictions]
    exact, (fprs, pros) = calculate_au_pro(gts, zeros)
    np.testing.assert_array_equal(fprs, [0, 1, 1])
    assert exact == pytest.approx([limit / 2 for limit in AUPRO_LIMITS])  # the diagonal
    sampled, _ = calculate_au_pro(gts, zeros, num_thresholds=99)
    assert sampled == [0.0] * len(AUPRO_LIMITS)


def test_class_without_anomalous_pixels_gives_nan_and_says_so(caplog: pytest.LogCaptureFixture):
    gts = [np.zeros((5, 5)), np.zeros((5, 5))]
    predictions = [np.random.default_rng(0).random((5, 5)) for _ in gts]
    with caplog.at_level(logging.WARNING):
        for num_thresholds in (None, 99):
            values, _ = calculate_au_pro(gts, predictions, num_thresholds=num_thresholds)
            assert all(math.isnan(v) for v in values)
    assert "no anomalous pixel" in caplog.text


def test_images_of_different_sizes():
    gts, predictions = random_case(5, sizes=((5, 9), (8, 4), (6, 6)))
    values, _ = calculate_au_pro(gts, predictions, 0.3)
    fprs, pros = brute_exact_curve(gts, predictions)
    assert values[0] == pytest.approx(brute_area(fprs, pros, 0.3) / 0.3)


@pytest.mark.parametrize(
    ("gts", "predictions", "message"),
    [
        ([np.zeros((3, 3))], [np.zeros((3, 4))], "must be equal 2-D"),
        ([np.zeros((3, 3))], [np.full((3, 3), np.nan)], "NaN"),
        ([np.zeros((3, 3))], [], "same non-zero number"),
    ],
)
def test_bad_inputs(gts, predictions, message):
    with pytest.raises(ValueError, match=message):
        calculate_au_pro(gts, predictions)


def test_trapezoid_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.2, 0.2, 0.5, 1.0]), np.array([0.0, 0.4, 0.6, 0.9, 1.0])
    for limit in (0.1, 0.2, 0.3, 1.0):
        assert trapezoid(x, y, limit) == pytest.approx(brute_area(x, y, limit))


# --- AUROCs ----------------------------------------------------------------------------------------------------------

def test_image_auroc_matches_mann_whitney():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # with ties
    assert image_auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))


def test_image_auroc_per_defect_compares_each_type_with_the_good_samples_only():
    defects = ["good", "dent", "stain", "good", "dent", "stain", "good"]
    labels = [0, 1, 1, 0, 1, 1, 0]
    scores = [0.5, 0.9, 0.1, 0.3, 0.4, 0.2, 0.6]
    per_defect = image_auroc_per_defect(defects, labels, scores)
    assert list(per_defect) == ["dent", "stain"]
    good = [0.5, 0.3, 0.6]
    assert per_defect["dent"] == pytest.approx(brute_auroc([0, 0, 0, 1, 1], good + [0.9, 0.4]))
    assert per_defect["stain"] == pytest.approx(brute_auroc([0, 0, 0, 1, 1], good + [0.1, 0.2])) == 0.0


def test_pixel_auroc_matches_mann_whitney():
    gts, predictions = random_case(6, levels=5)
    labels = np.concatenate([(g > 0).ravel() for g in gts])
    scores = np.concatenate([p.ravel() for p in predictions])
    assert pixel_auroc(gts, predictions) == pytest.approx(brute_auroc(labels, scores))


def test_auroc_with_a_single_label_is_nan():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))


# --- class metrics and result files ----------------------------------------------------------------------------------

def _class_outputs(seed: int):
    gts, predictions = random_case(seed)
    labels = [int((g > 0).any()) for g in gts]
    return labels, [float(p.max()) for p in predictions], gts, predictions, predictions


def test_class_metrics_dict():
    metrics = class_metrics(*_class_outputs(7), seconds=2.0)
    assert set(METRIC_KEYS) <= set(metrics)
    assert aupro_key(0.3) == "AUPRO@30%" and aupro_key(0.01, 99) == "AUPRO@1% (99 thr)"
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert metrics["n_test"] == 3 and metrics["n_anomalous"] == 2 and metrics["eval_samples_per_second"] == 1.5


def test_write_results(tmp_path: Path):
    per_class = {"dome": class_metrics(*_class_outputs(8), seconds=1.0), "box": class_metrics(*_class_outputs(9))}
    per_class["box"]["AUPRO@30%"] = math.nan  # a class without anomalies: NaN must survive as null / n/a
    path = write_results(tmp_path / "run", {"fusion": "full", "dataset_path": tmp_path}, per_class)

    document = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert document["config"]["fusion"] == "full"
    assert document["classes"]["box"]["AUPRO@30%"] is None
    assert document["mean"]["I-AUROC"] == pytest.approx(
        (per_class["dome"]["I-AUROC"] + per_class["box"]["I-AUROC"]) / 2
    )
    rows = list(csv.reader((tmp_path / "run/metrics.csv").open()))
    assert rows[0] == ["Metric", "dome", "box", "Mean"]
    assert [r[0] for r in rows[1:]] == list(METRIC_KEYS)
    assert rows[1][1] == f"{100 * per_class['dome']['I-AUROC']:.1f}"
    assert rows[3][2:] == ["n/a", "n/a"]
    markdown = (tmp_path / "run/metrics.md").read_text()
    assert markdown.startswith("| Metric | dome | box | Mean |\n|---|---|---|---|\n")


def test_failed_write_keeps_previous_file(tmp_path: Path):
    target = tmp_path / "metrics.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path, umask: int):
    """mkstemp creates 0600 files; a result, checkpoint or cache entry must be readable like any file we write."""
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "atomic.txt") as tmp:
            tmp.write_text("x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = (tmp_path / "atomic.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask


# --- native resolution -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(30, 50), (50, 30), (40, 40)])
def test_native_resolution_inverts_pad_and_resize(size: tuple[int, int]):
    mask = np.zeros(size, dtype=bool)
    mask[5:20, 8:25] = True
    square = mask_to_tensor(mask, 64)[0].numpy()
    native = to_native_resolution(square, size)
    assert native.shape == size
    agreement = ((native > 0.5) == mask).mean()
    assert agreement > 0.97
    np.testing.assert_allclose(to_native_resolution(np.full((64, 64), 3.0), size), 3.0)
