"""Which RGB branch should ``lite`` use? Variants of the 2D features measured on one class by a plain memory bank.

    python scripts/compare_lite_2d.py --dataset_path D --class_name C --out FILE.json
        [--variants lite0_224 lite0_448 lite1_224 lite2_224 stages_2 stages_2_3_4 stages_3_4 ...]
        [--borders 0 2 4] [--cache_dir DIR]

Every variant is the ``lite`` preset with another RGB branch (:data:`VARIANTS`: input size with the feature grid
following it, EfficientNet-Lite0/1/2, the stages). For each, the 2D features of the training split form a memory
bank (every ``bank_stride``-th valid cell, the stride growing with the grid so that the bank covers the same
image area), each channel standardised with the bank's mean and standard deviation; a test cell's score is its
Euclidean distance to the nearest bank entry, the map is box-smoothed over 3 × 3 cells, and an image's score is
its maximum over the valid cells — or over the valid cells at least ``border`` cells inside the image's edge (the
``--borders`` rule; a CNN's zero padding makes the outermost cells unlike any inside). Reported per variant and
border: I-AUROC, I-AUROC per defect type, P-AUROC over the valid cells, and the feature time per image. This is
the yardstick of the real-data issue (a memory bank on the lite features), so that a choice of the RGB branch does
not rest on one trained model; ``docs/real_data.md`` has the numbers measured on MVTec 3D-AD rope.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


from networks.extractors.efficientnet_lite import EfficientNetLiteConfig
from networks.features import PRESETS, ExtractorConfig, MultimodalFeatures
from utils.data.io import write_text_atomic
from utils.data.mvtec3d import MVTec3DDataset, make_dataloader
from utils.evaluation.metrics import image_auroc, image_auroc_per_defect, pixel_auroc
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import setup_logging, valid_mask

logger = logging.getLogger("compare_lite_2d")

_LITE = PRESETS["lite"]
VARIANTS: dict[str, ExtractorConfig] = {
    "lite0_224": _LITE,
    "lite0_448": dataclasses.replace(_LITE, img_size=448, feature_size=112),
    "lite0_448_grid56": dataclasses.replace(_LITE, img_size=448, feature_size=56),
    "lite1_224": dataclasses.replace(_LITE, rgb=EfficientNetLiteConfig("lite1", (2, 4))),
    "lite2_224": dataclasses.replace(_LITE, rgb=EfficientNetLiteConfig("lite2", (2, 4))),
    "stages_2": dataclasses.replace(_LITE, rgb=EfficientNetLiteConfig("lite0", (2,))),
    "stages_3_4": dataclasses.replace(_LITE, rgb=EfficientNetLiteConfig("lite0", (3, 4))),
    "stages_2_3_4": dataclasses.replace(_LITE, rgb=EfficientNetLiteConfig("lite0", (2, 3, 4))),
}
BANK_STRIDE_AT_56 = 4  # every 4th valid cell of a 56 × 56 grid; (G / 56)² × as many on a finer grid
QUERY_CHUNK = 2048


def erode_cells(valid: torch.Tensor, grid: int, border: int) -> torch.Tensor:
    """The valid cells at least ``border`` cells inside the valid area: (B, G²) → (B, G²), erosion by a
    (2·border + 1)² square, cells outside the grid counting as invalid."""
    if border == 0:
        return valid
    outside = (~valid).reshape(-1, 1, grid, grid).float()
    grown = F.max_pool2d(F.pad(outside, (border,) * 4, value=1.0), 2 * border + 1, stride=1)
    return valid & (grown.flatten(1) == 0)


def smoothed_max(distances: torch.Tensor, valid: torch.Tensor, cells: torch.Tensor, grid: int) -> torch.Tensor:
    """The 3 × 3 box mean of a (G²,) map over its ``valid`` cells only, then its maximum over ``cells`` (0 when
    there are none)."""
    weight = valid.reshape(1, 1, grid, grid).to(distances.dtype)
    total = F.avg_pool2d((distances * weight.flatten()).reshape(1, 1, grid, grid), 3, 1, 1, count_include_pad=False)
    count = F.avg_pool2d(weight, 3, 1, 1, count_include_pad=False)
    smooth = torch.where(count > 0, total / count.clamp_min(1e-12), 0.0).flatten()
    return smooth[cells].max() if cells.any() else smooth.new_zeros(())


def measure(config: ExtractorConfig, dataset_path: Path, class_name: str, borders: list[int],
            cache_dir: Path | None) -> dict:
    """One variant's bank on ``class_name``: I-AUROC (all, per defect type) per border rule, P-AUROC, timing."""
    extractor = MultimodalFeatures(config, modality="rgb")
    cache = FeatureCache(extractor, cache_dir)
    grid = extractor.grid_size
    train, test = (MVTec3DDataset(dataset_path, class_name, split, extractor.img_size, xyz="ignored",
                                  normalization=extractor.config.normalization) for split in ("train", "test"))
    stride = BANK_STRIDE_AT_56 * (grid // 56) ** 2
    rows, seconds = [], 0.0
    for batch in tqdm(make_dataloader(train, 1), desc="bank", unit="image", leave=False):
        start = time.perf_counter()
        f2d, _ = cache.features(batch)
        seconds += time.perf_counter() - start
        rows.append(f2d[0][valid_mask(batch, None, extractor)[0]][::stride])
    bank = torch.cat(rows)
    mean, std = bank.mean(dim=0), bank.std(dim=0).clamp_min(1e-6)
    bank = (bank - mean) / std
    labels, defects, gts, maps = [], [], [], []
    scores: dict[int, list[float]] = {b: [] for b in borders}
    for batch in tqdm(make_dataloader(test, 1), desc="test", unit="image", leave=False):
        start = time.perf_counter()
        f2d, _ = cache.features(batch)
        seconds += time.perf_counter() - start
        valid = valid_mask(batch, None, extractor)[0]
        queries = (f2d[0][valid] - mean) / std
        distances = torch.zeros(grid * grid)
        distances[valid] = torch.cat([torch.cdist(q, bank).amin(dim=1) for q in queries.split(QUERY_CHUNK)])
        for border in borders:
            inner = erode_cells(valid[None], grid, border)[0]
            scores[border].append(float(smoothed_max(distances, valid, inner, grid)))
        labels.append(batch.records[0].label)
        defects.append(batch.records[0].defect_type)
        gt = F.adaptive_max_pool2d(batch.gt[0], grid)[0].flatten()
        gts.append(gt[valid].numpy()[None] > 0)
        maps.append(distances[valid].numpy()[None])
    return {
        "feature_ms_per_image": 1000 * seconds / (len(train) + len(test)),
        "bank_size": int(bank.shape[0]),
        "p_auroc": pixel_auroc(gts, maps),
        "borders": {str(b): {"i_auroc": image_auroc(labels, scores[b]),
                             "i_auroc_per_defect": image_auroc_per_defect(defects, labels, scores[b])}
                    for b in borders},
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: I-AUROC per border rule, P-AUROC and feature time per variant, in percent and ms."""
    borders = list(next(iter(results.values()))["borders"])
    lines = ["| variant | " + " | ".join(f"I-AUROC, border {b}" for b in borders) + " | P-AUROC | ms per image |",
             "|---" * (len(borders) + 3) + "|"]
    for name, r in results.items():
        cells = [f"{100 * r['borders'][b]['i_auroc']:.1f}" for b in borders]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['p_auroc']:.1f} | "
                     f"{r['feature_ms_per_image']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", type=Path, required=True)
    parser.add_argument("--class_name", required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file; variants already in it are not rerun")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--borders", nargs="+", type=int, default=[0, 2, 4])
    parser.add_argument("--cache_dir", type=Path, help="feature cache (default: none, features computed each run)")
    args = parser.parse_args(argv)
    setup_logging()
    if min(args.borders) < 0:
        parser.error("--borders must be 0 or more")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.variants:
        if name not in results:
            results[name] = measure(VARIANTS[name], args.dataset_path, args.class_name, args.borders, args.cache_dir)
            write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        logger.info("%s: %s", name, {b: round(r["i_auroc"], 4) for b, r in results[name]["borders"].items()})
    print(table({name: results[name] for name in args.variants}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
