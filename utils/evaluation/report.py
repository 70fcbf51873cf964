"""The static HTML report of an inference run: every part sorted by score with its heatmap, the ground truth, the
decision against the calibrated threshold, and the per-class metrics (docs/inspecting.md).

One self-contained page (``report.html``, inline CSS, no script) next to ``metrics.json``; the images are small PNG
tiles under ``report/<class>/``, written by :class:`ReportBuilder` while the run goes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.io import write_text_atomic
from utils.evaluation.results import metrics_table, per_defect_table
from utils.evaluation.visualization import overlay, save_tiles, with_contour

THUMBNAIL = 160  # pixels per tile side in the report


@dataclass
class ReportPart:
    class_name: str
    name: str  # <defect>/<stem>
    label: int
    score: float
    rgb: np.ndarray  # (t, t, 3) uint8 thumbnail
    heat: np.ndarray  # (t, t) float16 anomaly map thumbnail
    gt: np.ndarray  # (t, t) bool


class ReportBuilder:
    """Collects the parts of a run (small thumbnails only) and writes the report at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.parts: list[ReportPart] = []
        self.thresholds: dict[str, float | None] = {}

    def add(self, class_name: str, name: str, label: int, score: float, rgb: np.ndarray, heat: np.ndarray,
            gt: np.ndarray) -> None:
        """One part: rgb (S, S, 3) uint8, heat (S, S) anomaly map, gt (S, S) bool, at the network size."""
        def small(array: np.ndarray, resample: int) -> np.ndarray:
            return np.asarray(Image.fromarray(array).resize((THUMBNAIL, THUMBNAIL), resample))

        self.parts.append(ReportPart(
            class_name, name, label, score, small(rgb, Image.BILINEAR),
            small(heat.astype(np.float32), Image.BILINEAR).astype(np.float16),
            small(gt.astype(np.uint8) * 255, Image.NEAREST) > 0))

    def write(self, per_class: dict[str, dict], title: str) -> Path:
        """The tiles and ``report.html``; heat is scaled per class (its largest value, or the calibration's)."""
        rows = []
        for class_name in sorted({p.class_name for p in self.parts}):
            parts = sorted((p for p in self.parts if p.class_name == class_name), key=lambda p: -p.score)
            scale = max(float(np.max(p.heat)) for p in parts) or 1.0
            threshold = self.thresholds.get(class_name)
            for rank, part in enumerate(parts, start=1):
                tile = Path("report") / class_name / f"{part.name.replace('/', '_')}.png"
                heat = np.clip(part.heat.astype(np.float32) / scale, 0, 1)
                save_tiles(self.run_dir / tile, [[with_contour(part.rgb, part.gt),
                                                  with_contour(overlay(part.rgb, heat), part.gt, (255, 255, 255))]],
                           ["part + ground truth", "anomaly map"])
                decision = "" if threshold is None else ("anomalous" if part.score > threshold else "good")
                rows.append((class_name, rank, part, tile, decision, threshold))
        write_text_atomic(self.run_dir / "report.html", _page(title, per_class, rows))
        return self.run_dir / "report.html"


def _page(title: str, per_class: dict[str, dict], rows: list) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<h2>Metrics</h2>", _metrics_table(per_class), "<h2>Parts by score</h2>"]
    current = None
    for class_name, rank, part, tile, decision, threshold in rows:
        if class_name != current:
            if current is not None:
                body.append("</tbody></table>")
            current = class_name
            limit = "no calibrated threshold (calibrate.py)" if threshold is None else f"threshold {threshold:.4g}"
            body.append(f"<h3>{esc(class_name)} <small>({esc(limit)})</small></h3>")
            body.append("<table class='parts'><thead><tr><th>#</th><th>part</th><th>truth</th><th>score</th>"
                        "<th>decision</th><th>heatmap</th></tr></thead><tbody>")
        truth = "anomalous" if part.label else "good"
        wrong = decision and decision != truth
        body.append(
            f"<tr class='{'miss' if wrong else ''}'><td>{rank}</td><td>{esc(part.name)}</td>"
            f"<td class='{truth}'>{truth}</td><td>{part.score:.4g}</td>"
            f"<td class='{decision}'>{decision or '—'}</td>"
            f"<td><img src='{esc(tile.as_posix())}' alt='{esc(part.name)}' loading='lazy'></td></tr>")
    if current is not None:
        body.append("</tbody></table>")
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#eee}"
             ".anomalous{color:#b00;font-weight:bold}.good{color:#070}tr.miss{background:#fff3cd}"
             "img{display:block;height:120px}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _metrics_table(per_class: dict[str, dict]) -> str:
    """The metrics (percent) and the I-AUROC per defect type, as in metrics.md."""
    tables = []
    for rows in (metrics_table(per_class), per_defect_table(per_class)):
        if not rows:
            continue
        head, *body = rows
        cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
        lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        tables.append(f"<table class='metrics'><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table>")
    return "\n".join(tables)
