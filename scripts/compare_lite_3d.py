"""Which 3D branch should ``lite`` use? CMDR-IAD trained and scored with each candidate on the same data.

    python scripts/compare_lite_3d.py --dataset_path D --class_names dome torus box --out DIR
        [--variants geometry fpfh central curvature depth stages_1_2 window_7 ...] [--model cmdr]
        [--epochs_no 20] [--batch_size 2] [--device cpu]

Every variant is the ``lite`` preset with another 3D branch (:data:`VARIANTS`); the RGB branch, the modules, the
training and the scoring stay the same. For each variant and class the script trains ``--model`` (train.py, its
checkpoints under ``DIR/<variant>``), scores the test split with ``scripts/map_diagnostics.py`` (each distance map
alone, the mapping and reconstruction terms and Ψ, per defect type; CMDR-IAD 2D+3D only) or, for other methods, with
inference.py, and writes ``DIR/<variant>.json``; at the end it prints one Markdown table of I-AUROC per class and
variant with the stains beside it. A variant already in ``DIR`` is not run again. The tables of
docs/lite_3d_branch.md were measured with it (40 training and 150 test samples per class:
``python -m utils.data.synthetic D --classes dome torus box --n_train 40 --n_test 150 --background none``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path


import inference
from networks.extractors.efficientnet_lite import EfficientNetLiteConfig
from networks.extractors.fpfh import FPFHConfig
from networks.extractors.geometry_images import GeometryImagesConfig
from networks.features import PRESETS, ExtractorConfig
from scripts import map_diagnostics
import train
from utils.data.io import write_text_atomic
from utils.runs.pipeline import setup_logging

logger = logging.getLogger("compare_lite_3d")

_LITE = PRESETS["lite"]
_NORMALS = GeometryImagesConfig()
VARIANTS: dict[str, ExtractorConfig] = {
    "fpfh": dataclasses.replace(_LITE, xyz=FPFHConfig(grid_stride=2)),
    "geometry": dataclasses.replace(_LITE, xyz=_NORMALS),
    "central": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, normals="central")),
    "window_3": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, window=3)),
    "window_7": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, window=7)),
    "curvature": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, images=("normals", "curvature"))),
    "depth": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, images=("normals", "depth"))),
    "stages_1_2": dataclasses.replace(_LITE, xyz=dataclasses.replace(
        _NORMALS, cnn=EfficientNetLiteConfig("lite0", (1, 2)))),
    "stages_2_3": dataclasses.replace(_LITE, xyz=dataclasses.replace(
        _NORMALS, cnn=EfficientNetLiteConfig("lite0", (2, 3)))),
    "geometry_fpfh": dataclasses.replace(_LITE, xyz=dataclasses.replace(_NORMALS, fpfh=FPFHConfig(grid_stride=2))),
    "geometry_fpfh_1": dataclasses.replace(_LITE, xyz=dataclasses.replace(
        _NORMALS, fpfh=FPFHConfig(grid_stride=2), fpfh_scale=1.0)),
    "geometry_fpfh_05": dataclasses.replace(_LITE, xyz=dataclasses.replace(
        _NORMALS, fpfh=FPFHConfig(grid_stride=2), fpfh_scale=0.5)),
    "curvature_fpfh": dataclasses.replace(_LITE, xyz=dataclasses.replace(
        _NORMALS, images=("normals", "curvature"), fpfh=FPFHConfig(grid_stride=2))),
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Train and score one variant on every class; {class: {row: {"all": I-AUROC, defect type: I-AUROC}}}."""
    preset = f"compare_lite_3d_{name}"
    PRESETS[preset] = VARIANTS[name]  # visible to train.py, inference.py and the predictor of this process only
    folder = args.out / name
    common = ["--dataset_path", str(args.dataset_path), "--model", args.model, "--preset", preset,
              "--epochs_no", str(args.epochs_no), "--batch_size", str(args.batch_size),
              "--cache_dir", str(args.out / "cache"), "--device", args.device]
    if train.main([*common, "--class_name", *args.class_names, "--checkpoint_savepath", str(folder)]) != 0:
        raise RuntimeError(f"training variant {name} failed")
    if args.model == "cmdr":
        out = folder / "map_diagnostics.json"
        if map_diagnostics.main(["--checkpoint_folder", str(folder), "--class_names", *args.class_names,
                                 "--dataset_path", str(args.dataset_path), "--device", args.device,
                                 "--epochs_no", str(args.epochs_no), "--batch_size", str(args.batch_size),
                                 "--out", str(out)]) != 0:
            raise RuntimeError(f"scoring variant {name} failed")
        return json.loads(out.read_text())["classes"]
    if inference.main([*common, "--class_names", *args.class_names, "--checkpoint_folder", str(folder),
                       "--results_dir", str(folder / "results"), "--run_name", name]) != 0:
        raise RuntimeError(f"scoring variant {name} failed")
    classes = json.loads((folder / "results" / name / "metrics.json").read_text())["classes"]
    return {c: {"full": {"all": m["I-AUROC"], **m["I-AUROC per defect type"]}} for c, m in classes.items()}


def summary(results: dict[str, dict]) -> str:
    """Ψ's I-AUROC (stains in brackets) per class and variant, and the mean."""
    classes = sorted({c for tables in results.values() for c in tables})
    lines = ["| variant | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for name, tables in results.items():
        full = [tables[c]["full"] for c in classes]
        cells = [f"{100 * f['all']:.1f} ({100 * f.get('stain', float('nan')):.0f})" for f in full]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * sum(f['all'] for f in full) / len(full):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", type=Path, required=True)
    parser.add_argument("--class_names", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="working folder: checkpoints, cache, results")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--model", default="cmdr")
    parser.add_argument("--epochs_no", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    results = {}
    for name in args.variants:
        done = args.out / f"{name}.json"
        if not done.is_file():
            args.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(done, json.dumps(run_variant(name, args), indent=2))
        results[name] = json.loads(done.read_text())
        logger.info("%s done", name)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
