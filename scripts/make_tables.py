"""Write the paper's result tables from our result folders, with the paper's CMDR-IAD numbers beside ours.

    python scripts/make_tables.py --runs RUN_DIR [RUN_DIR ...] --out OUT

Each RUN_DIR is an ``inference.py`` output folder (``metrics.json``); its configuration says which table row it
fills: ``--model`` (CMDR-IAD rows, or a method of the "Methods" tables), ``--modality rgb`` → 2D, ``xyz`` → 3D,
``rgbxyz`` → 2D+3D (by ``--fusion``: ``full`` for Tables 1–3 and 9, ``rec_only``/``map_only`` for Table 6,
``case1``…``case6`` for Tables 7 and 10). Writes ``OUT/tables.md`` and ``OUT/tables.tex``: Table 1 (I-AUROC),
2 (AUPRO@30%), 3 (AUPRO@1%), 6 (ablation), 7 and 10 (fusion variants), 9 (P-AUROC), and the methods side by side
(means, and I-AUROC per class), each with its published numbers (the CMDR-IAD paper's tables for CFM and BTF per
class, the published means of docs/methods.md). The paper's AUPRO is the reference code's 99-threshold
protocol, so our ``(99 thr)`` values are compared with it; the exact official values are shown in their own rows.
Δ = ours − paper, in points.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


from networks.methods.registry import DETECTORS
from utils.data.io import write_text_atomic
from utils.data.mvtec3d import MVTEC3D_CLASSES
from utils.logs import setup_logging

logger = logging.getLogger("make_tables")

PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
SETTINGS = {"rgb": "2D", "xyz": "3D", "rgbxyz": "2D+3D"}
SUMMARY_METRICS = ("I-AUROC", "P-AUROC", "AUPRO@30%", "AUPRO@1%")
Row = tuple[str, Mapping[str, float | None]]  # label, column -> value in percent (None: not available)


METHOD_NAMES = {"cmdr": "CMDR-IAD", "cfm": "CFM", "mafr": "MAFR", "btf": "BTF", "shape_guided": "Shape-Guided",
                "m3dm": "M3DM", "patchcore": "PatchCore"}
RunKey = tuple[str, str, str]  # model, setting, fusion


def load_runs(run_dirs: Sequence[Path]) -> dict[RunKey, dict]:
    """(model, setting, fusion) → {class: metrics in percent, "mean": ...} for every run folder."""
    runs: dict[RunKey, dict] = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass folders written by inference.py")
        document = json.loads(path.read_text())
        config = document["config"]
        model, modality, fusion = config.get("model", "cmdr"), config["modality"], config.get("fusion", "full")
        if model in DETECTORS and fusion in DETECTORS[model].variant_modalities:  # e.g. Shape-Guided's SDF-only row
            modality, fusion = DETECTORS[model].variant_modalities[fusion], "full"
        key = (model, SETTINGS[modality], fusion)
        if key in runs:
            logger.warning("%s: a second run for %s / %s / %s replaces the first", run_dir, *key)
        runs[key] = {name: _percent(m) for name, m in {**document["classes"], "mean": document["mean"]}.items()}
    return runs


def _percent(metrics: Mapping[str, object]) -> dict[str, float | None]:
    return {k: (None if v is None else 100.0 * float(v)) for k, v in metrics.items() if isinstance(v, (int, float))
            or v is None}


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def _delta(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def per_class_rows(label: str, ours: Mapping | None, paper: Mapping | None, metric: str, classes: Sequence[str],
                   paper_metric: str | None = None) -> list[Row]:
    """Ours (both AUPRO protocols where ``metric`` is an AUPRO), the paper, Δ; one column per class + mean."""
    columns = [*classes, "mean"]
    rows: list[Row] = []
    aupro = metric.startswith("AUPRO")
    ours_key = f"{metric} (99 thr)" if aupro else metric
    ours_values = {c: (ours or {}).get(c, {}).get(ours_key) for c in columns}
    rows.append((f"{label} ours" + (" (99 thr)" if aupro else ""), ours_values))
    if aupro:
        rows.append((f"{label} ours (exact)", {c: (ours or {}).get(c, {}).get(metric) for c in columns}))
    paper_values = {c: (paper or {}).get(c) for c in columns}
    rows.append((f"{label} paper", paper_values))
    rows.append((f"{label} Δ", {c: _delta(ours_values[c], paper_values[c]) for c in columns}))
    return rows


def summary_rows(label: str, ours: Mapping | None, paper: Mapping | None) -> list[Row]:
    """One configuration's mean metrics: ours (99-threshold AUPRO, and exact), the paper, Δ."""
    mean = (ours or {}).get("mean", {})
    ours_values = {m: mean.get(f"{m} (99 thr)" if m.startswith("AUPRO") else m) for m in SUMMARY_METRICS}
    exact = {m: mean.get(m) for m in SUMMARY_METRICS if m.startswith("AUPRO")}
    paper_values = {m: (paper or {}).get(m) for m in SUMMARY_METRICS}
    return [
        (f"{label} ours (AUPRO 99 thr)", ours_values),
        (f"{label} ours (AUPRO exact)", exact),
        (f"{label} paper", paper_values),
        (f"{label} Δ", {m: _delta(ours_values[m], paper_values[m]) for m in SUMMARY_METRICS}),
    ]


def method_tables(runs: Mapping[RunKey, dict], paper: Mapping, classes: Sequence[str]
                  ) -> list[tuple[str, list[str], list[Row]]]:
    """The methods side by side: mean metrics per (method, setting), and 2D+3D I-AUROC per class; each method's
    published numbers beside ours (CMDR-IAD: its paper's tables; the peers: ``paper["peers"]``)."""
    peers = paper["peers"]
    published_means = {**peers["means"], "cmdr": {
        setting: {m: paper[key].get(setting, {}).get("mean") for m, key in
                  (("I-AUROC", "table1_i_auroc"), ("P-AUROC", "table9_p_auroc"), ("AUPRO@30%", "table2_aupro30"),
                   ("AUPRO@1%", "table3_aupro1"))} for setting in SETTINGS.values()}}
    published_i_auroc = {**{m: rows["I-AUROC"] for m, rows in peers["per_class"].items()},
                         "cmdr": paper["table1_i_auroc"]}
    models = sorted({model for model, _, fusion in runs if fusion == "full"},
                    key=lambda m: (list(METHOD_NAMES).index(m) if m in METHOD_NAMES else len(METHOD_NAMES), m))
    means, per_class = [], []
    for model in models:
        name = METHOD_NAMES.get(model, model)
        for setting in SETTINGS.values():
            if (run := runs.get((model, setting, "full"))) is None:
                continue
            means += summary_rows(f"{name} {setting}", run, published_means.get(model, {}).get(setting))
            per_class += per_class_rows(f"{name} {setting}", run,
                                        published_i_auroc.get(model, {}).get(setting), "I-AUROC", classes)
    return [("Methods side by side: mean over classes (%)", list(SUMMARY_METRICS), means),
            ("Methods side by side: I-AUROC per class (%)", [*classes, "mean"], per_class)]


def build_tables(runs: Mapping[RunKey, dict], paper: Mapping, classes: Sequence[str]
                 ) -> list[tuple[str, list[str], list[Row]]]:
    """(title, columns, rows) of every table: CMDR-IAD's paper tables, then the methods side by side."""
    runs_of_cmdr = {(setting, fusion): run for (model, setting, fusion), run in runs.items() if model == "cmdr"}
    tables = _cmdr_tables(runs_of_cmdr, paper, classes)
    return tables + method_tables(runs, paper, classes)


def _cmdr_tables(runs: Mapping[tuple[str, str], dict], paper: Mapping, classes: Sequence[str]
                 ) -> list[tuple[str, list[str], list[Row]]]:
    columns = [*classes, "mean"]
    tables = []
    for title, key, metric in (("Table 1: I-AUROC (%)", "table1_i_auroc", "I-AUROC"),
                               ("Table 2: AUPRO@30% (%)", "table2_aupro30", "AUPRO@30%"),
                               ("Table 9: P-AUROC (%)", "table9_p_auroc", "P-AUROC")):
        rows = [row for setting in ("2D", "3D", "2D+3D")
                for row in per_class_rows(setting, runs.get((setting, "full")), paper[key].get(setting), metric,
                                          classes)]
        tables.append((title, columns, rows))
    tables.append(("Table 3: AUPRO@1% (%), 2D+3D", columns,
                   per_class_rows("2D+3D", runs.get(("2D+3D", "full")), paper["table3_aupro1"]["2D+3D"],
                                  "AUPRO@1%", classes)))
    names = {"rec_only": "Dual Reconstruction only", "map_only": "Cross-Modal Mapping only", "full": "CMDR-IAD"}
    tables.append(("Table 6: ablation, mean over classes (%)", list(SUMMARY_METRICS),
                   [row for fusion, name in names.items()
                    for row in summary_rows(name, runs.get(("2D+3D", fusion)), paper["table6_ablation"][fusion])]))
    variants = [f"case{i}" for i in range(1, 7)] + ["full"]
    tables.append(("Table 7: fusion variants, mean over classes (%)", list(SUMMARY_METRICS),
                   [row for fusion in variants
                    for row in summary_rows(fusion, runs.get(("2D+3D", fusion)), paper["table7_fusion"][fusion])]))
    tables.append(("Table 10: fusion variants per class (%)", columns,
                   [row for fusion in variants for metric in SUMMARY_METRICS
                    for row in per_class_rows(f"{fusion} {metric}", runs.get(("2D+3D", fusion)),
                                              paper["table10_fusion_per_class"][fusion][metric], metric, classes)]))
    return tables


def to_markdown(tables: Sequence[tuple[str, list[str], list[Row]]]) -> str:
    parts = []
    for title, columns, rows in tables:
        lines = [f"### {title}", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += ["| " + label + " | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |"
                  for label, values in rows]
        parts.append("\n".join(lines))
    note = ("AUPRO: `(99 thr)` is the sampled protocol of the reference code and the paper; `(exact)` is the "
            "official MVTec 3D-AD curve. Δ = ours − paper (percentage points); — = not available.")
    return "\n\n".join(parts) + "\n\n" + note + "\n"


def _latex_escape(text: str) -> str:
    return text.replace("%", r"\%").replace("_", r"\_").replace("Δ", r"$\Delta$").replace("—", "--")


def to_latex(tables: Sequence[tuple[str, list[str], list[Row]]]) -> str:
    parts = []
    for title, columns, rows in tables:
        header = " & ".join(["", *(_latex_escape(c) for c in columns)]) + r" \\"
        body = [" & ".join([_latex_escape(label), *(_latex_escape(_fmt(v.get(c))) for c in columns)]) + r" \\"
                for label, v in rows]
        parts.append("\n".join([
            r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(title)}}}", r"\resizebox{\linewidth}{!}{",
            rf"\begin{{tabular}}{{l{'r' * len(columns)}}}", r"\toprule", header, r"\midrule", *body, r"\bottomrule",
            r"\end{tabular}}", r"\end{table}",
        ]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="inference.py result folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        runs = load_runs(args.runs)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        logger.error("%s", err)
        return 1
    ours_classes = {c for run in runs.values() for c in run if c != "mean"}
    classes = list(MVTEC3D_CLASSES) + sorted(ours_classes - set(MVTEC3D_CLASSES))
    tables = build_tables(runs, json.loads(PAPER_RESULTS.read_text()), classes)
    write_text_atomic(args.out / "tables.md", to_markdown(tables))
    write_text_atomic(args.out / "tables.tex", to_latex(tables))
    logger.info("wrote %s and %s", args.out / "tables.md", args.out / "tables.tex")
    return 0


if __name__ == "__main__":
    sys.exit(main())
