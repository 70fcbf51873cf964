"""Can the frozen features alone tell the defects apart? A nearest-neighbour check, no training.

    python scripts/feature_separability.py --dataset_path D --class_names C [C ...|all]
        [--preset paper|tiny] [--random_init | --rgb_weights F --pointmae_weights F] [--modality rgbxyz|rgb|xyz]
        [--bank_stride 4] [--cache_dir DIR] [--out FILE]

For each class and each branch of the modality (F2D, F3D) the features of every ``bank_stride``-th valid pixel of
the training split form a memory bank (PatchCore without the coreset). A test pixel's score is the distance of its
feature to the nearest bank entry — the method's own distance ‖a/‖a‖ − b/‖b‖‖ — and an image's score is the
maximum over its valid pixels. Reported per branch: I-AUROC over all test samples and for each defect type against
the good samples, and P-AUROC over the valid pixels.

This is a ceiling check for the backbones, not a detector we ship: if a branch's numbers are near 0.5, its
features do not separate the defects from the normal variation, and no head trained on them (CMDR-IAD's mapping
and reconstruction modules included) can be expected to find them. With ``--random_init`` it shows why the tiny
demo cannot detect its defects (README, "Quick start"). Results go to ``--out`` (JSON) and a table to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


from utils.runs.feature_cache import FeatureCache
from utils.data.io import InputError, write_text_atomic
from utils.evaluation.metrics import image_auroc, image_auroc_per_defect, pixel_auroc
from utils.data.mvtec3d import Batch, MVTec3DDataset, make_dataloader
from utils.runs.pipeline import (
    RunConfig, add_feature_arguments, open_split, parse_run_args, prepare_run, setup_logging, valid_mask,
)
from utils.evaluation.results import json_safe, percent

logger = logging.getLogger("feature_separability")

BRANCH_NAMES = ("F2D", "F3D")
QUERY_CHUNK = 4096  # test pixels per distance matrix: bounds memory at (chunk × bank) floats


def nearest_neighbour_distances(bank: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Distance of every query to its nearest bank row, both L2-normalised first (F.normalize).

    Args:
        bank: (M, C) features.
        queries: (Q, C) features.

    Returns:
        (Q,) ‖q/‖q‖ − b/‖b‖‖₂ minimised over the bank.
    """
    bank = F.normalize(bank.float(), dim=-1)
    distances = [torch.cdist(F.normalize(chunk.float(), dim=-1), bank).amin(dim=1)
                 for chunk in queries.split(QUERY_CHUNK)]
    return torch.cat(distances) if distances else queries.new_zeros(0)


def _valid_features(cache: FeatureCache, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The valid pixels' features of a one-sample batch by branch name ((n, C) each, only the branches the
    extractor has) and the valid mask (G²,) of the feature grid."""
    f2d, f3d = cache.features(batch)
    mask = valid_mask(batch, f3d, cache.extractor)[0]
    return {name: f[0][mask] for name, f in zip(BRANCH_NAMES, (f2d, f3d)) if f is not None}, mask


def memory_bank(cache: FeatureCache, dataset: MVTec3DDataset, stride: int) -> dict[str, torch.Tensor]:
    """Every ``stride``-th valid pixel's features of every training sample, per branch: name → (M, C)."""
    rows: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(make_dataloader(dataset, 1), desc=f"{dataset.class_name} bank", unit="sample", leave=False):
        features, _ = _valid_features(cache, batch)
        for name, f in features.items():
            rows.setdefault(name, []).append(f[::stride])
    return {name: torch.cat(parts) for name, parts in rows.items()}


def class_separability(cache: FeatureCache, dataset_path: Path, class_name: str, modality: str,
                       bank_stride: int = 4) -> dict[str, dict]:
    """The nearest-neighbour I-AUROC (all and per defect type) and P-AUROC of each branch for one class."""
    extractor = cache.extractor
    bank = memory_bank(cache, open_split(extractor, dataset_path, class_name, "train", modality), bank_stride)
    test = open_split(extractor, dataset_path, class_name, "test", modality)
    labels, defects = [], []
    scores: dict[str, list[float]] = {name: [] for name in bank}
    gts: list[np.ndarray] = []
    maps: dict[str, list[np.ndarray]] = {name: [] for name in bank}
    for batch in tqdm(make_dataloader(test, 1), desc=f"{class_name} test", unit="sample", leave=False):
        features, mask = _valid_features(cache, batch)
        record = batch.records[0]
        labels.append(record.label)
        defects.append(record.defect_type)
        # P-AUROC over valid pixels only, as (1, n) "images" (background pixels would be easy negatives); on a
        # feature grid coarser than the image a cell is anomalous when any of its pixels is
        gt = F.adaptive_max_pool2d(batch.gt[0], extractor.grid_size)[0].flatten()
        gts.append(gt[mask.cpu()].numpy()[None] > 0)
        for name, f in features.items():
            distances = nearest_neighbour_distances(bank[name], f).cpu().numpy()
            scores[name].append(float(distances.max()) if distances.size else 0.0)
            maps[name].append(distances[None])
    result = {}
    for name in bank:
        result[name] = {
            "i_auroc": image_auroc(labels, scores[name]),
            "i_auroc_per_defect": image_auroc_per_defect(defects, labels, scores[name]),
            "p_auroc": pixel_auroc(gts, maps[name]),
            "bank_size": int(bank[name].shape[0]),
        }
    return result


def separability_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per class and branch; I-AUROC, P-AUROC and the per-defect I-AUROCs, in percent."""
    defects = sorted({d for per_class in results.values() for r in per_class.values() for d in r["i_auroc_per_defect"]})
    lines = ["| Class | Branch | I-AUROC | P-AUROC | " + " | ".join(defects) + " |",
             "|---|---|---|---|" + "---|" * len(defects)]
    for class_name, per_class in results.items():
        for branch, r in per_class.items():
            cells = [percent(r["i_auroc"]), percent(r["p_auroc"])]
            cells += [percent(r["i_auroc_per_defect"][d]) if d in r["i_auroc_per_defect"] else "–" for d in defects]
            lines.append(f"| {class_name} | {branch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser)
    parser.add_argument("--bank_stride", type=int, default=4,
                        help="keep every n-th valid training pixel in the bank (neighbouring pixels' features are "
                             "near duplicates; the paper preset needs ~16 to fit a class in memory)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parse_run_args(parser, argv)
    setup_logging()
    if args.bank_stride < 1:
        parser.error("--bank_stride must be at least 1")
    config = RunConfig.from_args(args)
    try:
        class_names, cache = prepare_run(config)
        results = {}
        for class_name in class_names:
            results[class_name] = class_separability(cache, config.dataset_path, class_name, config.modality,
                                                     args.bank_stride)
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 2
    logger.info("nearest-neighbour separability of the frozen features:\n%s", separability_table(results))
    if args.out is not None:
        payload = {"config": {**config.to_dict(), "bank_stride": args.bank_stride}, "classes": results}
        write_text_atomic(args.out, json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
        logger.info("results in %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
