"""Train and evaluate a set of classes for one configuration, resumably: one command per table row.

    python scripts/reproduce.py --dataset_path D [--class_name all] [--model cmdr|cfm|mafr|btf|shape_guided]
        [--modality rgbxyz|rgb|xyz] [--fusion full|case1..case6|rec_only|map_only|sdf_only|rgb_only] [--seed 115]
        [--preset paper]
        [--results_dir results] [--run_name NAME] [--save_raw_maps] [train.py options ...]

For each class: train (skipped when the identical run finished; an interrupted training continues), evaluate, and
store the class's metrics in ``<results_dir>/<run_name>/classes/<class>.json``; a class whose metrics exist is
skipped, so rerunning the command after an interruption finishes the job. A progress line per class; at the end
``metrics.json|md|csv`` for all classes. Configurations share the feature cache (it is keyed by the extractor, not
by the configuration), so the 2D, 3D and fusion runs compute each sample's features once.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import check_fusion, evaluate_class, fusion_choices  # noqa: E402
from train import INTERRUPTED_EXIT, TrainingInterrupted, train_class  # noqa: E402
from utils.checkpoints import versions  # noqa: E402
from utils.io import InputError, write_text_atomic  # noqa: E402
from utils.pipeline import (  # noqa: E402
    RunConfig, add_run_arguments, parse_run_args, prepare_run, setup_logging,
)
from utils.results import write_results  # noqa: E402

logger = logging.getLogger("reproduce")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, training=True)
    parser.add_argument("--fusion", choices=fusion_choices(), default="full",
                        help="fusion variant of the method (inference.py --fusion)")
    parser.add_argument("--results_dir", type=Path, default=Path("results"))
    parser.add_argument("--run_name", help="default: <model>_<modality>_<fusion>_<preset>_seed<seed>")
    parser.add_argument("--eval_resolution", choices=("input", "native"), default="input")
    parser.add_argument("--save_raw_maps", action="store_true")
    args = parse_run_args(parser, argv)
    setup_logging()
    config = RunConfig.from_args(args)
    check_fusion(parser, config, args.fusion)
    default_name = f"{config.model}_{config.modality}_{args.fusion}_{config.preset}_seed{config.seed}"
    run_dir = args.results_dir / (args.run_name or default_name)
    run_config = {**config.to_dict(), "fusion": args.fusion, "eval_resolution": args.eval_resolution}
    try:
        class_names, cache = prepare_run(config)
        extractor = cache.extractor
        per_class = {}
        for position, class_name in enumerate(class_names, 1):
            done = run_dir / "classes" / f"{class_name}.json"
            if done.is_file() and json.loads(done.read_text())["config"] == run_config:
                per_class[class_name] = json.loads(done.read_text())["metrics"]
                logger.info("[%d/%d] %s: done earlier, skipped", position, len(class_names), class_name)
                continue
            start = time.perf_counter()
            train_class(class_name, config, cache, resume=True)
            metrics = evaluate_class(class_name, config, cache, args.fusion, args.eval_resolution,
                                     run_dir, save_raw_maps=args.save_raw_maps)
            write_text_atomic(done, json.dumps({"config": run_config, "metrics": metrics}, indent=2) + "\n")
            per_class[class_name] = metrics
            logger.info("[%d/%d] %s: I-AUROC %.3f  AUPRO@30%% %.3f  (%.0f s)", position, len(class_names), class_name,
                        metrics["I-AUROC"], metrics["AUPRO@30%"], time.perf_counter() - start)
    except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    except TrainingInterrupted as err:  # rerunning the same command resumes (finished classes are skipped)
        logger.warning("%s. Continue with the same command: %s", err,
                       shlex.join(["python", "scripts/reproduce.py", *(sys.argv[1:] if argv is None else argv)]))
        return INTERRUPTED_EXIT
    write_results(run_dir, {**run_config, "class_names": class_names, "extractor": extractor.metadata,
                            "versions": versions()}, per_class)
    logger.info("results in %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
