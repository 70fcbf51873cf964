"""Which of CMDR-IAD's maps sees which defect? Each distance map scored alone, beside the fused maps.

    python scripts/map_diagnostics.py --checkpoint_folder RUN --class_names C [C ...] --dataset_path D
        [--fusions map_only rec_only full case6] [--out FILE] [--epochs_no E] [--batch_size B]
        [--device auto|cpu|cuda]

``RUN`` is the run folder of a trained CMDR-IAD 2D+3D model (as for ``calibrate.py``; the demo's is
``data/demo/checkpoints/lite``). For every test sample each of the four distance maps becomes an image score the
way Ψ does: zero outside the valid pixels, smoothed with box(7, 3)∘box(5, 5), divided by the square root of its
mean over the non-zero pixels and maximised (``d_rec2d`` first pre-smoothed, as the fusion takes it). Ψ of each
fusion variant in ``--fusions`` is scored as inference.py scores it (``map_only`` is the mapping term α·J,
``rec_only`` the reconstruction term A_rec). Reported per row: I-AUROC over all test samples and per defect type
against the good samples. A defect type that a map separates alone but Ψ does not is one the fusion loses; the
README's stain table ("Quick start") was measured with this script. Results: a Markdown table per class in the log,
and JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm


from networks.blocks.fusion import (
    FUSION_VARIANTS, final_smoothing, normalize_scores, pre_smooth_rgb_reconstruction,
)
from utils.data.io import InputError, write_text_atomic
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.evaluation.metrics import image_auroc, image_auroc_per_defect
from utils.runs.pipeline import setup_logging, valid_mask, xyz_policy
from utils.station.predictor import Predictor, add_run_arguments

logger = logging.getLogger("map_diagnostics")

DISTANCE_MAPS = ("d_map2d", "d_map3d", "d_rec2d", "d_rec3d")
DEFAULT_FUSIONS = ("map_only", "rec_only", "full", "case6")


def single_map_scores(name: str, distance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Image scores (B,) of one distance map (B, S, S) treated as Ψ: masked, smoothed, normalised, maximised."""
    if name == "d_rec2d":
        distance = pre_smooth_rgb_reconstruction(distance)
    return normalize_scores(final_smoothing(distance, valid))[1]


@torch.no_grad()
def score_test_split(predictor: Predictor, dataset_path: Path, fusions: tuple[str, ...]
                     ) -> tuple[dict[str, list[float]], list[int], list[str]]:
    """Image scores of every row (the four maps, then the fusions) over the class's test split, with the labels
    and defect types."""
    model, extractor = predictor.model, predictor.extractor
    if model.name != "cmdr" or model.modality != "rgbxyz":
        raise InputError(f"{predictor.class_name}: map diagnostics need a CMDR-IAD 2D+3D run, this one is "
                         f"{model.name} ({model.modality})")
    dataset = MVTec3DDataset(dataset_path, predictor.class_name, "test", extractor.img_size,
                             xyz_policy(model.modality), extractor.config.normalization)
    scores: dict[str, list[float]] = {row: [] for row in (*DISTANCE_MAPS, *fusions)}
    for index in tqdm(range(len(dataset)), desc=f"{predictor.class_name} test", unit="sample", leave=False):
        batch = collate_samples([dataset[index]])
        f2d, f3d = extractor.get_features_maps(batch.rgb.to(extractor.device), batch.xyz.to(extractor.device))
        maps, valid = model.image_size_maps(f2d, f3d, valid_mask(batch, f3d, extractor))
        maps = {name: distance.float() for name, distance in maps.items()}
        for name in DISTANCE_MAPS:
            scores[name].append(float(single_map_scores(name, maps[name], valid)[0]))
        for variant in fusions:
            scores[variant].append(float(normalize_scores(model.fuse(maps, valid, variant))[1][0]))
    return scores, dataset.labels, [record.defect_type for record in dataset.records]


def class_table(scores: dict[str, list[float]], labels: list[int], defect_types: list[str]
                ) -> dict[str, dict[str, float]]:
    """Row → {"all": I-AUROC, defect type: I-AUROC against the good samples, ...}."""
    return {row: {"all": image_auroc(labels, values), **image_auroc_per_defect(defect_types, labels, values)}
            for row, values in scores.items()}


def markdown(class_name: str, table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"| {class_name}: I-AUROC | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{100 * values[c]:.1f}" for c in columns) + " |"
              for row, values in table.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--class_name", "--class_names", dest="class_names", nargs="+", required=True)
    parser.add_argument("--dataset_path", type=Path, required=True, help="dataset root with <class>/test")
    parser.add_argument("--fusions", nargs="+", choices=FUSION_VARIANTS, default=list(DEFAULT_FUSIONS),
                        help="fusion variants scored beside the single maps (default: map_only rec_only full case6)")
    parser.add_argument("--out", type=Path, help="JSON file for the tables")
    args = parser.parse_args(argv)
    setup_logging()
    tables = {}
    try:
        for class_name in args.class_names:
            predictor = Predictor.load(args.checkpoint_folder, class_name, args.device, args.epochs_no,
                                       args.batch_size)
            tables[class_name] = class_table(*score_test_split(predictor, args.dataset_path, tuple(args.fusions)))
            logger.info("\n%s", markdown(class_name, tables[class_name]))
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    if args.out is not None:
        write_text_atomic(args.out, json.dumps({"checkpoint_folder": str(args.checkpoint_folder),
                                                "dataset_path": str(args.dataset_path), "classes": tables},
                                               indent=2))
        logger.info("tables written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
