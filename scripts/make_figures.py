"""Figure panels like the paper's Figs. 5–7: RGB, point cloud, ground truth and the anomaly maps of several runs.

    python scripts/make_figures.py --dataset_path D --runs RUN_DIR [RUN_DIR ...] --out OUT
        [--samples CLASS/DEFECT/STEM ...]

Each RUN_DIR is an ``inference.py`` folder written with ``--save_raw_maps`` (typically the 2D, 3D and 2D+3D runs).
One PNG per class: a row per sample — RGB | depth rendering of the cloud | ground truth | each run's map over the
RGB (one colour scale per run and class). Default samples: the first of every defect type.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np


from utils.data.mvtec3d import MVTec3DDataset
from utils.logs import setup_logging
from utils.data.transforms import denormalize_rgb
from utils.evaluation.visualization import depth_image, overlay, save_tiles, with_contour

logger = logging.getLogger("make_figures")
RUN_LABELS = {"rgb": "2D", "xyz": "3D", "rgbxyz": "2D+3D"}


def run_label(run_dir: Path) -> str:
    config = json.loads((run_dir / "metrics.json").read_text())["config"]
    label = RUN_LABELS[config["modality"]]
    return label if config.get("fusion", "full") == "full" else f"{label} {config['fusion']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", nargs="+", help="CLASS/DEFECT/STEM, e.g. bagel/crack/003")
    args = parser.parse_args(argv)
    setup_logging()

    labels = [run_label(run) for run in args.runs]
    available = sorted({p.parent.name for run in args.runs for p in (run / "maps").glob("*/*.npy")})
    if not available:
        logger.error("no raw maps in %s: run inference.py with --save_raw_maps", ", ".join(map(str, args.runs)))
        return 1
    wanted = [s.split("/") for s in args.samples] if args.samples else None
    for class_name in available:
        maps = [{p.stem: np.load(p) for p in sorted((run / "maps" / class_name).glob("*.npy"))} for run in args.runs]
        scales = [max((float(m.max()) for m in run_maps.values()), default=1.0) or 1.0 for run_maps in maps]
        size = next(iter(maps[0].values())).shape[0]
        dataset = MVTec3DDataset(args.dataset_path, class_name, "test", img_size=size, xyz="optional")
        rows, seen = [], set()
        for index, record in enumerate(dataset.records):
            key = f"{record.defect_type}_{record.stem}"
            chosen = ([class_name, record.defect_type, record.stem] in wanted) if wanted else (
                record.defect_type not in seen)
            if not chosen or any(key not in run_maps for run_maps in maps):
                continue
            seen.add(record.defect_type)
            sample = dataset[index]
            rgb = denormalize_rgb(sample.rgb)
            gt = sample.gt[0].numpy() > 0
            xyz = sample.xyz.permute(1, 2, 0).numpy() if sample.xyz is not None else np.zeros_like(rgb, float)
            tiles = [rgb, depth_image(xyz), with_contour(rgb, gt)]
            tiles += [with_contour(overlay(rgb, run_maps[key] / scale), gt, (255, 255, 255))
                      for run_maps, scale in zip(maps, scales)]
            rows.append(tiles)
        if rows:
            path = args.out / f"{class_name}.png"
            save_tiles(path, rows, ["RGB", "point cloud", "ground truth", *labels], title=class_name)
            logger.info("wrote %s (%d samples)", path, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
