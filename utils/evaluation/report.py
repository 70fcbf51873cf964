"""The static HTML report of an inference run (docs/inspecting.md, "The report"): per class, the decision an
engineer takes — where good and defective scores lie and where the threshold cuts, the ROC curve with the operating
point, the confusion table and the detection per defect type at the threshold, the PRO curve — then every part
sorted by score with its heatmap, the ground truth and its decision; the per-class metrics on top.

One self-contained page (``report.html``, inline CSS, no script) next to ``metrics.json``; the images are PNG files
under ``report/<class>/`` (tiles written by :class:`ReportBuilder` while the run goes, the pictures at the end by
:mod:`utils.evaluation.figures`). The threshold is the run's calibrated one, or — without a calibration — the one
``calibrate.py`` would pick from the class's validation parts, said as such and not stored.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.io import write_text_atomic
from utils.evaluation import figures
from utils.evaluation.clouds import render_views
from utils.evaluation.metrics import threshold_decisions
from utils.evaluation.results import metrics_table, per_defect_table
from utils.evaluation.visualization import overlay, save_tiles, with_contour

THUMBNAIL = 160  # pixels per tile side in the report
WORST_ON_THE_CLOUD = 4  # the highest-scoring parts of a class rendered on their point cloud


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
        self.thresholds: dict[str, float | None] = {}  # the run's calibrated thresholds (None: not calibrated)
        self.suggested: dict[str, tuple[float, int]] = {}  # without one: calibrate.py's pick, from n good parts
        self.curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the exact PRO curve of each class
        self.clouds: dict[str, list[tuple[float, str, np.ndarray, np.ndarray]]] = {}  # the worst parts' clouds

    def add_cloud(self, class_name: str, name: str, score: float, xyz: np.ndarray, heat: np.ndarray) -> None:
        """A part's organised cloud (S, S, 3) and map (S, S) at the network size, kept while it is among the
        class's :data:`WORST_ON_THE_CLOUD` highest scores."""
        kept = self.clouds.setdefault(class_name, [])
        kept.append((score, name, xyz.astype(np.float32), heat.astype(np.float32)))
        kept.sort(key=lambda entry: -entry[0])
        del kept[WORST_ON_THE_CLOUD:]

    def threshold(self, class_name: str) -> tuple[float | None, str]:
        """The class's threshold and where it comes from, in words."""
        calibrated = self.thresholds.get(class_name)
        if calibrated is not None:
            return calibrated, f"calibrated threshold {calibrated:.4g}"
        if class_name in self.suggested:
            value, count = self.suggested[class_name]
            return value, (f"threshold {value:.4g}: what calibrate.py would pick from the {count} validation parts "
                           "(not stored: run calibrate.py)")
        return None, "no calibrated threshold (calibrate.py)"

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
        """The tiles, the pictures and ``report.html``; heat is scaled per class (its largest value)."""
        sections = []
        for class_name in sorted({p.class_name for p in self.parts}):
            parts = sorted((p for p in self.parts if p.class_name == class_name), key=lambda p: -p.score)
            scale = max(float(np.max(p.heat)) for p in parts) or 1.0
            threshold, source = self.threshold(class_name)
            rows = []
            for rank, part in enumerate(parts, start=1):
                tile = Path("report") / class_name / f"{part.name.replace('/', '_')}.png"
                heat = np.clip(part.heat.astype(np.float32) / scale, 0, 1)
                save_tiles(self.run_dir / tile, [[with_contour(part.rgb, part.gt),
                                                  with_contour(overlay(part.rgb, heat), part.gt, (255, 255, 255))]],
                           ["part + ground truth", "anomaly map"])
                decision = "" if threshold is None else ("anomalous" if part.score > threshold else "good")
                rows.append((rank, part, tile, decision))
            decision_html = self._decision(class_name, parts, threshold, per_class.get(class_name, {}))
            decision_html += self._worst_on_the_cloud(class_name, scale)
            sections.append((class_name, source, decision_html, rows))
        write_text_atomic(self.run_dir / "report.html", _page(title, per_class, sections))
        return self.run_dir / "report.html"

    def _decision(self, class_name: str, parts: list[ReportPart], threshold: float | None, metrics: dict) -> str:
        """The class's pictures and tables of the decision, as HTML (the PNG files are written here)."""
        scores = np.array([p.score for p in parts])
        labels = np.array([p.label for p in parts])
        folder = Path("report") / class_name
        figures_html = []
        if len(set(labels.tolist())) < 2:
            return "<p>The test split has only one kind of part: no decision to picture.</p>"
        figures.score_distribution(self.run_dir / folder / "decision.png", scores, labels, threshold)
        caption = "Image scores of the test parts"
        if threshold is not None:
            rates = threshold_decisions(threshold, scores, labels)
            caption += (f": good {rates['true_negatives']} ≤ t, {rates['false_positives']} > t (false alarms); "
                        f"defective {rates['false_negatives']} ≤ t (misses), {rates['true_positives']} > t")
        figures_html.append(_figure(folder / "decision.png", caption, "decision"))
        figures.roc_with_operating_point(self.run_dir / folder / "roc.png", scores, labels, threshold)
        caption = f"ROC curve, I-AUROC {_percent(metrics.get('I-AUROC'))}"
        if threshold is not None:
            caption += (f"; the threshold: false-alarm rate {_percent(rates['false_alarm_rate'])}, detection rate "
                        f"{_percent(1 - rates['miss_rate'])}")
        figures_html.append(_figure(folder / "roc.png", caption, "roc"))
        if class_name in self.curves:
            fprs, pros = self.curves[class_name]
            figures.pro_curve(self.run_dir / folder / "pro.png", fprs, pros)
            figures_html.append(_figure(folder / "pro.png",
                                        f"PRO curve to 30 % FPR, AUPRO@30% {_percent(metrics.get('AUPRO@30%'))}",
                                        "pro"))
        tables = "" if threshold is None else _confusion(rates) + _per_defect(parts, threshold)
        return "<div class='figures'>" + "".join(figures_html) + "</div>" + tables


    def _worst_on_the_cloud(self, class_name: str, scale: float) -> str:
        """The class's highest-scoring parts rendered on their clouds (sensor's view, oblique view), as HTML."""
        if not self.clouds.get(class_name):
            return ""
        items = []
        for score, name, xyz, heat in self.clouds[class_name]:
            tile = Path("report") / class_name / f"{name.replace('/', '_')}_cloud.png"
            save_tiles(self.run_dir / tile, [list(render_views(xyz, heat, scale, THUMBNAIL * 2))],
                       ["sensor's view", "oblique view"])
            items.append(_figure(tile, f"{name}: score {score:.4g}", "cloud"))
        return ("<h3>The highest-scoring parts on their point clouds</h3><div class='figures'>" + "".join(items)
                + "</div>")


def _percent(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f} %"


def _figure(path: Path, caption: str, kind: str) -> str:
    esc = html.escape
    return (f"<figure class='{kind}'><img src='{esc(path.as_posix())}' alt='{esc(caption)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _confusion(rates: dict) -> str:
    """The confusion table at the threshold, with the miss and false-alarm rates."""
    return ("<table class='confusion'><thead><tr><th></th><th>called good</th><th>called anomalous</th>"
            "<th>rate</th></tr></thead><tbody>"
            f"<tr><th>good</th><td>{rates['true_negatives']}</td><td>{rates['false_positives']}</td>"
            f"<td>false alarms {_percent(rates['false_alarm_rate'])}</td></tr>"
            f"<tr><th>defective</th><td>{rates['false_negatives']}</td><td>{rates['true_positives']}</td>"
            f"<td>misses {_percent(rates['miss_rate'])}</td></tr></tbody></table>")


def _per_defect(parts: list[ReportPart], threshold: float) -> str:
    """Detected / all parts of each defect type at the threshold."""
    types = sorted({p.name.split("/")[0] for p in parts if p.label})
    rows = []
    for defect in types:
        scores = [p.score for p in parts if p.label and p.name.split("/")[0] == defect]
        detected = sum(score > threshold for score in scores)
        rows.append(f"<tr><td>{html.escape(defect)}</td><td>{detected} of {len(scores)}</td>"
                    f"<td>{_percent(detected / len(scores))}</td></tr>")
    return ("<table class='per-defect'><thead><tr><th>defect type</th><th>detected</th><th>rate</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def _page(title: str, per_class: dict[str, dict], sections: list) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<h2>Metrics</h2>", _metrics_table(per_class)]
    for class_name, source, decision_html, rows in sections:
        body.append(f"<h2>{esc(class_name)}</h2><p class='threshold'>{esc(source)}</p>")
        body.append("<h3>The decision</h3>" + decision_html)
        body.append("<h3>Parts by score</h3>")
        body.append("<table class='parts'><thead><tr><th>#</th><th>part</th><th>truth</th><th>score</th>"
                    "<th>decision</th><th>heatmap</th></tr></thead><tbody>")
        for rank, part, tile, decision in rows:
            truth = "anomalous" if part.label else "good"
            wrong = decision and decision != truth
            body.append(
                f"<tr class='{'miss' if wrong else ''}'><td>{rank}</td><td>{esc(part.name)}</td>"
                f"<td class='{truth}'>{truth}</td><td>{part.score:.4g}</td>"
                f"<td class='{decision}'>{decision or '—'}</td>"
                f"<td><img src='{esc(tile.as_posix())}' alt='{esc(part.name)}' loading='lazy'></td></tr>")
        body.append("</tbody></table>")
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#eee}"
             ".anomalous{color:#b00;font-weight:bold}.good{color:#070}tr.miss{background:#fff3cd}"
             "table.parts img{display:block;height:120px}.figures{display:flex;flex-wrap:wrap;gap:1em}"
             "figure{margin:0 0 1em 0;max-width:520px}figure img{max-width:100%}figcaption{font-size:0.9em}")
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
