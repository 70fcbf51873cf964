"""Result files of an evaluation run (docs/metrics.md).

``<results_dir>/<run_name>/metrics.json`` holds everything (the run's configuration, per-class metrics as
fractions, their mean); ``metrics.md`` and ``metrics.csv`` hold the paper's table layout: one row per metric,
one column per class, the mean last, percent with one decimal. All three are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.data.io import write_text_atomic
from utils.evaluation.metrics import METRIC_KEYS, PER_DEFECT_KEY, mean_metrics

PerClass = Mapping[str, Mapping[str, Any]]


def json_safe(value: Any) -> Any:
    """NaN/inf become null (strict JSON has no NaN); paths and other objects become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def percent(value: Any) -> str:
    """A fraction in percent with one decimal; ``n/a`` for a missing or non-finite value."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def metrics_table(per_class: PerClass) -> list[list[str]]:
    """The paper's layout as rows of strings: header, then one row per metric (percent, one decimal)."""
    means = mean_metrics({c: dict(m) for c, m in per_class.items()})
    rows = [["Metric", *per_class, "Mean"]]
    for key in METRIC_KEYS:
        rows.append([key, *(percent(per_class[c].get(key)) for c in per_class), percent(means[key])])
    return rows


def per_defect_table(per_class: PerClass) -> list[list[str]]:
    """I-AUROC of each defect type (against the good samples) per class, percent; [] when no class has them."""
    defects = sorted({d for metrics in per_class.values() for d in metrics.get(PER_DEFECT_KEY, {})})
    if not defects:
        return []
    rows = [["I-AUROC by defect type", *per_class]]
    for defect in defects:
        rows.append([defect, *(percent(per_class[c].get(PER_DEFECT_KEY, {}).get(defect)) for c in per_class)])
    return rows


def _markdown(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return lines


def metrics_markdown(per_class: PerClass) -> str:
    """:func:`metrics_table` (and :func:`per_defect_table`) as markdown, with a note on the two AUPRO protocols."""
    lines = _markdown(metrics_table(per_class))
    if defect_rows := per_defect_table(per_class):
        lines += ["", *_markdown(defect_rows)]
    note = (
        "\nValues in percent. `AUPRO@x%` is the exact official MVTec 3D-AD curve; `AUPRO@x% (99 thr)` is the "
        "sampled 99-threshold protocol of the reference code and the paper's tables.\n"
    )
    return "\n".join(lines) + "\n" + note


def metrics_csv(per_class: PerClass) -> str:
    """:func:`metrics_table` as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(metrics_table(per_class))
    return buffer.getvalue()


def write_results(run_dir: str | Path, config: Mapping[str, Any], per_class: PerClass) -> Path:
    """Write metrics.json, metrics.md and metrics.csv into ``run_dir`` (created if needed).

    Args:
        run_dir: ``<results_dir>/<run_name>``.
        config: everything needed to rerun the evaluation.
        per_class: class name -> metrics dict of :func:`utils.evaluation.metrics.class_metrics`.

    Returns:
        The path of metrics.json.
    """
    if not per_class:
        raise ValueError("no class results to write")
    run_dir = Path(run_dir)
    document = {
        "config": config,
        "classes": per_class,
        "mean": mean_metrics({c: dict(m) for c, m in per_class.items()}),
    }
    text = json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n"
    write_text_atomic(run_dir / "metrics.md", metrics_markdown(per_class))
    write_text_atomic(run_dir / "metrics.csv", metrics_csv(per_class))
    write_text_atomic(run_dir / "metrics.json", text)
    return run_dir / "metrics.json"
