"""Evaluate trained checkpoints of a detection method on the test split, one class at a time (docs/training.md).

    python inference.py --dataset_path D --class_names C [C ...|all] [--model METHOD]
        [--model_option K=V]
        [--checkpoint_folder ...] [--epochs_no E] [--batch_size B] [--seed 115] [--eval_batch_size 1]
        [--modality rgbxyz|rgb|xyz] [--fusion full|case1..case6|rec_only|map_only|sdf_only|rgb_only]
        [--results_dir results] [--run_name NAME] [--save_maps] [--save_ply] [--eval_resolution input|native]
        [--preset paper|lite|tiny] [--random_init] [--cache_dir DIR] [--amp] ...

The checkpoints are those of the run folder of (model, modality, seed) under ``--checkpoint_folder``;
``--epochs_no``/``--batch_size`` (the training run's) are needed only when that folder holds several runs of a
class. ``--eval_batch_size`` sets how many test samples go through the network at once.

Writes ``<results_dir>/<run_name>/metrics.json`` (configuration, per-class and mean metrics), ``metrics.md`` and
``metrics.csv`` (the paper's table layout), ``scores/<class>.csv`` (per-sample image scores and timing) and, with
``--save_maps``, one PNG panel per test sample under ``maps/<class>/`` (``--save_raw_maps``: the maps as .npy;
``--save_ply``: each part's point cloud coloured by its map, ``clouds/<class>/*.ply``), and ``report.html``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from networks.blocks.fusion import FUSION_VARIANTS
from networks.methods.detector import Detector
from networks.methods.registry import detector_class, detector_names
from utils.data.io import InputError, atomic_path, read_mask, read_xyz, write_text_atomic
from utils.data.mvtec3d import make_dataloader, resolve_class_names
from utils.data.transforms import denormalize_rgb, to_native_resolution
from utils.evaluation.clouds import write_anomaly_ply
from utils.evaluation.metrics import PER_DEFECT_KEY, class_metrics, image_auroc_per_defect
from utils.evaluation.report import ReportBuilder
from utils.evaluation.results import metrics_markdown, write_results
from utils.evaluation.visualization import save_panel
from utils.runs.checkpoints import (
    CheckpointError, adopt_recorded_settings, load_modules, read_sidecar, runs_in, select_run, sidecar_path,
    versions,
)
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import (
    DEFAULT_PRESET, RunConfig, add_run_arguments, autocast, model_identity, open_split, parse_run_args,
    prepare_run, setup_logging, valid_mask,
)
from utils.station.calibration import calibrate_threshold
from utils.station.predictor import threshold_path

logger = logging.getLogger("inference")


def evaluate_class(class_name: str, config: RunConfig, cache: FeatureCache, fusion: str, eval_resolution: str,
                   run_dir: Path, save_maps: bool = False, save_raw_maps: bool = False,
                   report: ReportBuilder | None = None, save_ply: bool = False) -> dict:
    """Score the test split of one class and return its metrics dict (``report``: collect its parts;
    ``save_ply``: each part's cloud coloured by its map, utils.evaluation.clouds)."""
    extractor = cache.extractor
    model = config.build_detector(extractor)
    epochs, batch_size = select_run(config.run_dir, class_name, config.epochs_no, config.batch_size)
    calibration_file = threshold_path(config.run_dir, class_name, epochs, batch_size)
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else {}
    if report is not None:
        report.thresholds[class_name] = calibration.get("threshold")
    load_modules(model.trainable(), config.run_dir, class_name, epochs, batch_size,
                 expected=model_identity(extractor, model))
    model.eval()
    dataset = open_split(extractor, config.dataset_path, class_name, "test", config.modality)
    device = extractor.device

    records, labels, image_scores, seconds, clouds = [], [], [], [], []
    gts, aupro_maps, pixel_maps, panels = [], [], [], []
    for batch in tqdm(make_dataloader(dataset, config.eval_batch_size), desc=f"{class_name} test", unit="batch",
                      leave=False):
        start = time.perf_counter()
        with torch.no_grad():
            f2d, f3d = cache.features(batch)
            with autocast(device, config.amp):
                prediction = model.predict(f2d, f3d, valid_mask(batch, f3d, extractor), fusion, xyz=batch.xyz)
            # one transfer per batch: the device loop above holds no per-sample host synchronisation
            aupro_map, image_score, pixel_scores = (t.float().cpu().numpy() for t in (
                prediction.maps, prediction.image_scores, prediction.pixel_scores))
        elapsed = (time.perf_counter() - start) / len(batch)
        for i, record in enumerate(batch.records):
            records.append(record)
            labels.append(record.label)
            image_scores.append(float(image_score[i]))
            seconds.append(elapsed)
            maps = (aupro_map[i], pixel_scores[i])
            if eval_resolution == "native":
                size = batch.original_sizes[i]
                maps = tuple(to_native_resolution(m, size) for m in maps)
                gts.append(read_mask(record.gt_path) if record.gt_path else np.zeros(size, dtype=bool))
            else:
                gts.append(batch.gt[i, 0].numpy() > 0)
            aupro_maps.append(maps[0])
            pixel_maps.append(maps[1])
            if report is not None:
                report.add(class_name, f"{record.defect_type}/{record.stem}", record.label, image_scores[-1],
                           denormalize_rgb(batch.rgb[i], dataset.normalization), aupro_map[i],
                           batch.gt[i, 0].numpy() > 0)
                if batch.xyz is not None:
                    report.add_cloud(class_name, record.name, image_scores[-1],
                                     batch.xyz[i].permute(1, 2, 0).numpy(), aupro_map[i])
            if save_ply and record.xyz_path is not None:  # the part's own cloud, the map at its resolution
                clouds.append((record, image_scores[-1], to_native_resolution(aupro_map[i],
                                                                              batch.original_sizes[i])))
            if save_maps:
                xyz = None if batch.xyz is None else batch.xyz[i].permute(1, 2, 0).numpy()
                rgb = denormalize_rgb(batch.rgb[i], dataset.normalization)
                panels.append((record, rgb, xyz, batch.gt[i, 0].numpy() > 0, aupro_map[i], image_scores[-1]))
            if save_raw_maps:  # the map for AUPRO at the network size, e.g. for scripts/make_figures.py
                with atomic_path(run_dir / "maps" / class_name / f"{record.defect_type}_{record.stem}.npy") as tmp:
                    with tmp.open("wb") as handle:
                        np.save(handle, aupro_map[i].astype(np.float32))

    curves: dict = {}
    metrics = class_metrics(labels, image_scores, gts, aupro_maps, pixel_maps, seconds=float(np.sum(seconds)),
                            curves=curves)
    if report is not None:
        report.curves[class_name] = curves["pro"]
        if report.thresholds[class_name] is None and (config.dataset_path / class_name / "validation").is_dir():
            good = validation_scores(class_name, config, cache, model, fusion)
            report.suggested[class_name] = (calibrate_threshold(good), len(good))
    metrics[PER_DEFECT_KEY] = image_auroc_per_defect([r.defect_type for r in records], labels, image_scores)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["sample", "label", "image_score", "seconds"])
    writer.writerows([r.name, l, f"{s:.6g}", f"{t:.4f}"] for r, l, s, t in zip(records, labels, image_scores, seconds))
    write_text_atomic(run_dir / "scores" / f"{class_name}.csv", table.getvalue())
    if clouds:  # one colour scale per class: the calibration's, else the largest map value
        scale = float(calibration.get("map_scale") or 0) or max(float(np.max(c[2])) for c in clouds) or 1.0
        for record, score, heat in clouds:
            write_anomaly_ply(run_dir / "clouds" / class_name / f"{record.defect_type}_{record.stem}.ply",
                              read_xyz(record.xyz_path), heat, scale, score, record.name, calibration.get("threshold"))
    if panels:
        scale = max(float(np.max(p[4])) for p in panels) or 1.0  # one scale per class: panels are comparable
        for record, rgb, xyz, gt, heat, score in panels:
            path = run_dir / "maps" / class_name / f"{record.defect_type}_{record.stem}.png"
            title = f"{class_name} {record.name}  score {score:.3f}"
            save_panel(path, rgb, xyz, gt, heat / scale, title)
    return metrics


def validation_scores(class_name: str, config: RunConfig, cache: FeatureCache, model: Detector, fusion: str
                      ) -> np.ndarray:
    """Image scores of the class's validation parts (good), as calibrate.py scores them: for the report's threshold
    when the run has no calibration."""
    dataset = open_split(cache.extractor, config.dataset_path, class_name, "validation", config.modality)
    scores = []
    for batch in make_dataloader(dataset, config.eval_batch_size):
        with torch.no_grad():
            f2d, f3d = cache.features(batch)
            with autocast(cache.extractor.device, config.amp):
                prediction = model.predict(f2d, f3d, valid_mask(batch, f3d, cache.extractor), fusion, xyz=batch.xyz)
        scores += prediction.image_scores.float().cpu().tolist()
    return np.array(scores)


def adopt_run_settings(args: argparse.Namespace) -> None:
    """Take the extractor options the command line leaves out (preset, random_init, bn_mode, weights files) from
    the sidecars of the runs to evaluate; a given option that contradicts them is an error naming both values.

    Runs without a sidecar (the authors' checkpoints) record nothing: the defaults apply (the paper preset).
    """
    config = RunConfig.from_args(args)
    recorded: dict = {}
    source = None
    class_names = resolve_class_names(config.dataset_path, config.class_names)
    missing: list[CheckpointError] = []
    for class_name in class_names:
        try:
            epochs, batch_size = select_run(config.run_dir, class_name, config.epochs_no, config.batch_size)
        except CheckpointError as err:
            missing.append(err)
            continue  # evaluate_class reports it, with the training command
        sidecar = read_sidecar(config.run_dir, class_name, epochs, batch_size)
        if sidecar is None:
            continue
        extractor = sidecar.get("extractor", {})
        settings = {"preset": sidecar.get("preset"), "random_init": extractor.get("random_init"),
                    "bn_mode": sidecar.get("extractor_config", {}).get("bn_mode"),
                    "rgb_weights": extractor.get("rgb_weights"), "pointmae_weights": extractor.get("pointmae_weights")}
        path = sidecar_path(config.run_dir, class_name, epochs, batch_size)
        if source is not None and settings != recorded:
            raise CheckpointError(f"{source} and {path} were trained with different extractor settings "
                                  f"({recorded} vs {settings}): evaluate them in separate runs")
        recorded, source = settings, path
    if len(missing) == len(class_names) and missing:  # no run at all: say so before any extractor is built
        found = runs_in(config.checkpoint_dir, class_names[0])
        beside = f"; {config.checkpoint_dir} holds: " + "; ".join(found) if found else ""
        raise CheckpointError(f"{missing[0]} (--model {config.model} --modality {config.modality} --seed "
                              f"{config.seed}){beside}")
    adopt_recorded_settings(args, recorded, source, defaults={"preset": DEFAULT_PRESET, "random_init": False,
                                                               "bn_mode": None},
                            paths=("rgb_weights", "pointmae_weights"))


def fusion_choices() -> list[str]:
    """Every method's fusion variants: CMDR-IAD's first, then the others'."""
    extra = {v for name in detector_names() for v in detector_class(name).fusion_variants} - set(FUSION_VARIANTS)
    return [*FUSION_VARIANTS, *sorted(extra)]


def check_fusion(parser: argparse.ArgumentParser, config: RunConfig, fusion: str) -> None:
    """The method's fusion variants apply to its 2D+3D model; a single modality has only ``full``."""
    variants = detector_class(config.model).fusion_variants if config.modality == "rgbxyz" else ("full",)
    if fusion not in variants:
        parser.error(f"--fusion {fusion}: --model {config.model} --modality {config.modality} has "
                     f"{', '.join(variants)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, training=False)
    parser.add_argument("--fusion", choices=fusion_choices(), default="full",
                        help="fusion of the 2D+3D model: full (Eq. 7), case1..case6 (Eqs. 1-6), rec_only, map_only "
                             "(cmdr); shape_guided: full, sdf_only, rgb_only (its single-memory rows)")
    parser.add_argument("--results_dir", type=Path, default=Path("results"))
    parser.add_argument("--run_name", help="default: <model>_<modality>_<fusion>_<preset>")
    parser.add_argument("--save_maps", action="store_true", help="write a heatmap panel per test sample")
    parser.add_argument("--save_raw_maps", action="store_true",
                        help="also write each sample's anomaly map as .npy (input for scripts/make_figures.py)")
    parser.add_argument("--save_ply", action="store_true",
                        help="write each test part's point cloud coloured by its anomaly map (clouds/<class>/*.ply)")
    parser.add_argument("--eval_resolution", choices=("input", "native"), default="input",
                        help="input: maps and gt at the network size (224, as the paper); native: maps upsampled "
                             "to each image's size and compared with the original gt (official MVTec protocol)")
    args = parse_run_args(parser, argv)
    setup_logging()
    try:
        adopt_run_settings(args)
    except InputError as err:
        logger.error("%s", err)
        return 1
    config = RunConfig.from_args(args)
    check_fusion(parser, config, args.fusion)
    run_dir = args.results_dir / (args.run_name or f"{config.model}_{config.modality}_{args.fusion}_{config.preset}")
    try:
        class_names, cache = prepare_run(config)
        extractor = cache.extractor
        per_class = {}
        report = ReportBuilder(run_dir)
        for class_name in class_names:
            if not (config.dataset_path / class_name / "test").is_dir():
                logger.warning("%s: no test split (%s): nothing to measure; the run scores parts with predict.py and "
                               "gets its threshold from calibrate.py", class_name,
                               config.dataset_path / class_name / "test")
                continue
            per_class[class_name] = evaluate_class(class_name, config, cache, args.fusion, args.eval_resolution,
                                                   run_dir, args.save_maps, args.save_raw_maps, report, args.save_ply)
            logger.info("%s: I-AUROC %.3f  P-AUROC %.3f  AUPRO@30%% %.3f", class_name,
                        per_class[class_name]["I-AUROC"], per_class[class_name]["P-AUROC"],
                        per_class[class_name]["AUPRO@30%"])
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    if not per_class:
        logger.warning("no class with a test split: no metrics written")
        return 0
    run_config = {**config.to_dict(), "fusion": args.fusion, "eval_resolution": args.eval_resolution,
                  "class_names": list(per_class), "extractor": extractor.metadata, "versions": versions()}
    write_results(run_dir, run_config, per_class)
    print(metrics_markdown(per_class))
    title = f"{run_dir.name}: {config.model} {config.modality} {args.fusion}, preset {config.preset}"
    logger.info("results in %s; open %s to look at the parts", run_dir, report.write(per_class, title))
    if args.save_maps:
        logger.info("heatmap panels in %s", run_dir / "maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
