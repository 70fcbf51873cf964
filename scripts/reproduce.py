"""Train and evaluate a set of classes for one configuration, resumably: one command per table row.

    python scripts/reproduce.py --dataset_path D [--class_name all] [--model METHOD]
        [--modality rgbxyz|rgb|xyz] [--fusion full|case1..case6|rec_only|map_only|sdf_only|rgb_only] [--seed 115]
        [--preset paper] [--results_dir results] [--run_name NAME] [--save_raw_maps]
        [--engine local|ray] [--address auto|HOST:PORT] [--cpus_per_task 1] [--gpus_per_task 0] [--threads N]
        [train.py options ...]

For each class: train (skipped when the identical run finished; an interrupted training continues), evaluate, and
store the class's metrics in ``<results_dir>/<run_name>/classes/<class>.json``; a class whose metrics exist is
skipped, so rerunning the command after an interruption finishes the job. A progress line per class; at the end
``metrics.json|md|csv`` for all classes. Configurations share the feature cache (it is keyed by the extractor, not
by the configuration), so the 2D, 3D and fusion runs compute each sample's features once.

``--engine ray`` runs the classes as parallel Ray tasks (docs/reproducing.md, "Running on a cluster"): each requests
``--cpus_per_task`` CPUs and ``--gpus_per_task`` GPUs, is retried once when it fails, and is then reported in the
summary while the others finish (the exit code is 1 when one failed). ``--address`` joins a running cluster
(``auto``, or ``HOST:PORT``); without it a local Ray instance starts. Paths must be shared by all nodes.

Both engines run every class with the same number of torch threads, ``--threads`` (default: torch's default on
the machine that starts the command, i.e. its cores), recorded in the run's configuration: a float sum depends on
how it is split over threads, so the same count gives the two engines the same numbers bit for bit. On machines
with different core counts set ``--threads`` to one number for exact agreement (a Ray task then runs that many
threads whatever ``--cpus_per_task`` it requested for scheduling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


from inference import check_fusion, evaluate_class, fusion_choices
from train import INTERRUPTED_EXIT, TrainingInterrupted, train_class
from utils.runs.checkpoints import versions
from utils.runs.feature_cache import FeatureCache
from utils.data.io import InputError, write_text_atomic
from utils.data.mvtec3d import resolve_class_names
from utils.runs.pipeline import (
    RunConfig, add_run_arguments, parse_run_args, prepare_run, setup_logging,
)
from utils.evaluation.results import write_results

logger = logging.getLogger("reproduce")


@dataclass(frozen=True)
class ClassTask:
    """One class of one configuration: what a local loop step or a Ray task does."""

    config: RunConfig
    class_name: str
    fusion: str
    eval_resolution: str
    run_dir: Path
    save_raw_maps: bool
    run_config: dict
    threads: int | None = None  # torch threads (--threads), the same for both engines

    @property
    def result_path(self) -> Path:
        return self.run_dir / "classes" / f"{self.class_name}.json"

    def finished(self) -> dict | None:
        """The stored result when this very configuration already finished the class."""
        if self.result_path.is_file():
            stored = json.loads(self.result_path.read_text())
            if stored["config"] == self.run_config:
                return stored
        return None


def run_class(task: ClassTask, cache: FeatureCache | None = None) -> dict:
    """Train (resumably) and evaluate one class, store ``{"config", "metrics", "extractor"}`` atomically, return it.

    Without ``cache`` (a Ray worker) the extractors are built here, for this class only.
    """
    if task.threads:
        torch.set_num_threads(task.threads)
    if cache is None:
        setup_logging()
        _, cache = prepare_run(dataclasses.replace(task.config, class_names=[task.class_name]))
    train_class(task.class_name, task.config, cache, resume=True)
    metrics = evaluate_class(task.class_name, task.config, cache, task.fusion, task.eval_resolution, task.run_dir,
                             save_raw_maps=task.save_raw_maps)
    result = {"config": task.run_config, "metrics": metrics, "extractor": cache.extractor.metadata}
    write_text_atomic(task.result_path, json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, training=True)
    parser.add_argument("--fusion", choices=fusion_choices(), default="full",
                        help="fusion variant of the method (inference.py --fusion)")
    parser.add_argument("--results_dir", type=Path, default=Path("results"))
    parser.add_argument("--run_name", help="default: <model>_<modality>_<fusion>_<preset>_seed<seed>")
    parser.add_argument("--eval_resolution", choices=("input", "native"), default="input")
    parser.add_argument("--save_raw_maps", action="store_true")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: the classes one after another; ray: as parallel Ray tasks")
    parser.add_argument("--address", help="ray: a running cluster (auto or HOST:PORT); default: a local instance")
    parser.add_argument("--cpus_per_task", type=float, default=1.0, help="ray: CPUs each task requests")
    parser.add_argument("--gpus_per_task", type=float, default=0.0, help="ray: GPUs each task requests")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every class, both engines (default: torch's default here, the "
                             "machine's cores); the same count gives the same numbers bit for bit")
    args = parse_run_args(parser, argv)
    setup_logging()
    config = RunConfig.from_args(args)
    check_fusion(parser, config, args.fusion)
    default_name = f"{config.model}_{config.modality}_{args.fusion}_{config.preset}_seed{config.seed}"
    run_dir = args.results_dir / (args.run_name or default_name)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be 1 or more")
    threads = args.threads or torch.get_num_threads()
    run_config = {**config.to_dict(), "fusion": args.fusion, "eval_resolution": args.eval_resolution,
                  "threads": threads}
    try:
        class_names = resolve_class_names(config.dataset_path, config.class_names)
    except InputError as err:
        logger.error("%s", err)
        return 1
    tasks = [ClassTask(config, c, args.fusion, args.eval_resolution, run_dir, args.save_raw_maps, run_config,
                       threads) for c in class_names]
    results: dict[str, dict] = {}
    for task in tasks:
        if (stored := task.finished()) is not None:
            results[task.class_name] = stored
            logger.info("%s: done earlier, skipped", task.class_name)
    todo = [task for task in tasks if task.class_name not in results]
    failures: dict[str, str] = {}
    progress = tqdm(total=len(todo), desc="classes", unit="class", disable=not todo)

    def finished(task: ClassTask, result: dict | None, error: BaseException | None, seconds: float) -> None:
        progress.update()
        if error is not None:
            failures[task.class_name] = f"{type(error).__name__}: {error}"
            logger.error("%s failed: %s", task.class_name, failures[task.class_name])
            return
        results[task.class_name] = result
        metrics = result["metrics"]
        logger.info("%s: I-AUROC %.3f  AUPRO@30%% %.3f  (%.0f s)", task.class_name, metrics["I-AUROC"],
                    metrics["AUPRO@30%"], seconds)

    start = time.perf_counter()
    if args.engine == "ray":
        from utils.runs.ray_engine import run_tasks

        try:
            run_tasks(run_class, todo, address=args.address, cpus_per_task=args.cpus_per_task,
                      gpus_per_task=args.gpus_per_task,
                      on_result=lambda t, r, e: finished(t, r, e, time.perf_counter() - start))
        except ImportError as err:
            logger.error("%s", err)
            return 1
    elif todo:
        try:
            _, cache = prepare_run(config)
            for task in todo:
                began = time.perf_counter()
                finished(task, run_class(task, cache), None, time.perf_counter() - began)
        except InputError as err:  # the user's data, files or settings; anything else is a bug: traceback
            logger.error("%s", err)
            return 1
        except TrainingInterrupted as err:  # rerunning the same command resumes (finished classes are skipped)
            logger.warning("%s. Continue with the same command: %s", err,
                           shlex.join(["python", "scripts/reproduce.py", *(sys.argv[1:] if argv is None else argv)]))
            return INTERRUPTED_EXIT
    progress.close()
    if failures:
        logger.error("%d of %d classes failed (the others are stored; rerun to retry the failed ones):\n  %s",
                     len(failures), len(tasks), "\n  ".join(f"{c}: {e}" for c, e in failures.items()))
        return 1
    extractor = next((r["extractor"] for r in results.values() if "extractor" in r), None)
    write_results(run_dir, {**run_config, "class_names": class_names, "extractor": extractor,
                            "versions": versions()}, {c: results[c]["metrics"] for c in class_names})
    logger.info("results in %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
