"""Speed and memory of a detection method as CMDR-IAD's Table 4 measures them, and the cost of a training epoch.

    python benchmark.py --preset paper|lite|tiny [--model METHOD]
        [--model_option K=V] [--random_init]
        [--device cpu|cuda] [--out FILE] [--dataset_path D --class_name C] [--rgb_weights F] [--pointmae_weights F]
        [--batch_size 1] [--train_memory]

* ``fps``: inference as the paper measures it — the whole pipeline from loading a test sample to its scores
  (read and transform the files, both frozen extractors without cache, the ``method`` stage: its modules and
  fusion (CMDR-IAD: the four modules) or its memory-bank search, and the image score and map normalisation),
  one sample at a time (``--batch_size B``: B at once, the seconds per part), CUDA synchronised before every
  clock reading, averaged over the test set after one warm-up batch.
* ``peak_memory_mb``: CUDA — the allocator's peak during inference; CPU — the process's peak resident memory.
* ``train_epoch_seconds_cached`` / ``_uncached``: one training epoch (batch size 1) reading features from the cache /
  computing them at every step; ``snapshot_seconds`` / ``snapshot_megabytes``: writing the resume state after an
  epoch (modules and Adam moments). Memory-bank methods (btf) instead report ``fit_seconds`` (features cached
  beforehand) and ``bank_megabytes``, the size of their memory banks.
* ``stages``: mean seconds per sample of each inference stage; ``branch_seconds``: the RGB backbone and the 3D
  branch each timed alone (2D+3D methods), so that the 3D branch's cost reads as a multiple of the RGB backbone's.
* ``--train_memory`` (instead of everything else): ``train_step_peak_memory_mb`` and ``train_step_seconds``, the
  peak and the time of one training step (forward, backward, Adam step) of the method's modules on random
  features of the preset's shapes, for batch sizes 1 and 2, without and with ``train.py
  --activation_checkpointing``, each in a fresh process (CPU: its peak resident memory; CUDA: the allocator's
  peak); a step that does not fit is reported as such.
* ``predictor_seconds_per_part``: the same path through :class:`utils.station.predictor.Predictor` (what ``predict.py``
  does per part: read the files, score, decide, map back to the part's resolution), batch 1.
* ``roofline``: this process's own dense matmul rate (fp32, and bf16 where the device runs it), measured in the same
  run, and per stage its FLOP count (torch's FLOP counter on the warm-up sample: convolutions and matrix products;
  numpy work such as FPFH counts 0), seconds and the fraction of the fp32 matmul rate it reaches — ratios, because
  absolute seconds on a shared machine are noise.

Without ``--dataset_path`` a small synthetic class (8 train, 8 test samples of 400×400) is generated in a temporary
folder. The numbers are printed and, with ``--out``, written as JSON. Module weights are random (untrained): speed
does not depend on them; memory banks are fitted on the training split first (their search time depends on
their size).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from networks.blocks.activation_checkpointing import set_activation_checkpointing
from networks.features import PRESETS, MultimodalFeatures
from networks.methods.detector import Detector, MemoryBankDetector
from networks.methods.registry import build_detector, detector_class, extractor_config, parse_model_options
from train import make_optimizers, optimisation_step
from utils.data.io import write_text_atomic
from utils.data.mvtec3d import MVTec3DDataset, collate_samples, make_dataloader
from utils.data.synthetic import SyntheticConfig, generate_dataset
from utils.runs.checkpoints import save_resume_state
from utils.runs.feature_cache import FeatureCache
from utils.runs.pipeline import (
    DEFAULT_SEED, add_model_arguments, model_option_pairs, open_split, resolve_device, seed_everything, setup_logging,
    valid_mask,
)
from utils.runs.training_set import TrainingSet, index_loader
from utils.station.predictor import Predictor


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


MATMUL_SIZE = 2048  # square operands of the rate measurement: large enough to reach the matrix unit's rate
MATMUL_REPEATS = 3
# A dtype the device only emulates (bf16 on a CPU without AVX-512 bf16 or AMX: ~1 GFLOP/s) would take minutes at
# MATMUL_SIZE; the operands grow from 256 only while the next size's product is expected within this budget.
MATMUL_BUDGET_SECONDS = 1.0


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float | None:
    """FLOP/s of a dense square matrix product on ``device`` in ``dtype`` (best of a few, after a warm-up), at
    MATMUL_SIZE or at the largest power of two from 256 whose product fits the time budget; None where the device
    does not run that dtype."""
    size = 256
    while True:
        try:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            a @ b
        except RuntimeError:
            return None
        best = float("inf")
        for _ in range(MATMUL_REPEATS):
            start = _clock(device)
            a @ b
            best = min(best, _clock(device) - start)
        if size >= MATMUL_SIZE or 8 * best * (MATMUL_REPEATS + 1) > MATMUL_BUDGET_SECONDS:
            return 2 * size**3 / best
        size *= 2


def count_flops(function, *args, **kwargs) -> tuple[object, int]:
    """``function(*args, **kwargs)`` and the FLOPs torch counts in it (matrix products, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        result = function(*args, **kwargs)
    return result, counter.get_total_flops()


def inference_speed(extractor: MultimodalFeatures, model: Detector, dataset: MVTec3DDataset, batch_size: int = 1
                    ) -> dict:
    """Whole-pipeline seconds per test sample, per stage and in total (after a warm-up batch), and the FLOPs of each
    stage (counted on the warm-up, which is not timed). ``batch_size`` parts go through the pipeline at once (a
    line with several cameras, a folder scored offline); the seconds are per part."""
    device = extractor.device
    stages: dict[str, list[float]] = defaultdict(list)
    flops: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    starts = list(range(0, len(dataset) - batch_size + 1, batch_size))  # whole batches only
    if len(starts) < 2:
        raise ValueError(f"a batch size of {batch_size} needs at least {2 * batch_size} test samples "
                         f"(a warm-up batch and one timed), the split has {len(dataset)}")
    for number, first in enumerate(starts):
        indices = range(first, first + batch_size)
        if number == 0:  # warm-up: count the FLOPs (the counter slows the run down, so this batch is not timed)
            batch = collate_samples([dataset[i] for i in indices])
            with torch.no_grad():
                (f2d, f3d), flops["features"] = count_flops(extractor.get_features_maps, batch.rgb.to(device),
                                                            batch.xyz.to(device))
                _, flops["method"] = count_flops(model.predict, f2d, f3d, valid_mask(batch, f3d, extractor),
                                                 xyz=batch.xyz)
            flops = {name: count / batch_size for name, count in flops.items()}
            flops["load"] = 0
            flops["total"] = sum(flops.values())
            continue
        start = _clock(device)
        batch = collate_samples([dataset[i] for i in indices])
        loaded = _clock(device)
        with torch.no_grad():
            f2d, f3d = extractor.get_features_maps(batch.rgb.to(device), batch.xyz.to(device))
            extracted = _clock(device)
            model.predict(f2d, f3d, valid_mask(batch, f3d, extractor), xyz=batch.xyz)
        done = _clock(device)
        for name, seconds in (("load", loaded - start), ("features", extracted - loaded),
                              ("method", done - extracted), ("total", done - start)):
            stages[name].append(seconds / batch_size)
    means = {name: sum(values) / len(values) for name, values in stages.items()}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rates = {"fp32": matmul_rate(device, torch.float32), "bf16": matmul_rate(device, torch.bfloat16)}
    roofline = {
        "matmul_gflops_per_second": {dtype: None if rate is None else rate / 1e9 for dtype, rate in rates.items()},
        "stages": {name: {"gflop": flops[name] / 1e9, "seconds": seconds,
                          "fraction_of_fp32_matmul_rate": flops[name] / seconds / rates["fp32"]}
                   for name, seconds in means.items()},
    }
    return {"fps": 1.0 / means["total"], "peak_memory_mb": peak, "stages": means, "roofline": roofline}


def branch_seconds(extractor: MultimodalFeatures, dataset: MVTec3DDataset) -> dict[str, float]:
    """Mean seconds per test sample of each feature branch run alone (after one warm-up sample): ``rgb`` (the
    RGB backbone) and ``xyz`` (the 3D branch, e.g. the geometry images' rendering and CNN pass, or FPFH). Where
    ``get_features_maps`` runs them side by side their sum exceeds its time."""
    device = extractor.device
    branches = {"rgb": lambda batch: extractor.extract_rgb_parts(batch.rgb),
                "xyz": lambda batch: extractor.extract_xyz_parts(batch.xyz)}
    seconds: dict[str, list[float]] = defaultdict(list)
    for index in range(len(dataset)):
        batch = collate_samples([dataset[index]])
        for name, branch in branches.items():
            start = _clock(device)
            with torch.no_grad():
                branch(batch)
            if index > 0:
                seconds[name].append(_clock(device) - start)
    return {name: sum(values) / len(values) for name, values in seconds.items()}


def predictor_seconds(extractor: MultimodalFeatures, model: Detector, dataset: MVTec3DDataset) -> float:
    """Mean seconds per part of :class:`utils.station.predictor.Predictor` on the test files (after one warm-up
    part)."""
    predictor = Predictor(model, extractor, dataset.class_name, sidecar={})
    seconds = [predictor(rgb=r.rgb_path, xyz=r.xyz_path).seconds for r in dataset.records]
    return sum(seconds[1:]) / max(len(seconds) - 1, 1)


def fit_seconds(extractor: MultimodalFeatures, model: MemoryBankDetector, dataset: MVTec3DDataset,
                cache_dir: Path) -> dict[str, float]:
    """Seconds of fitting a memory-bank method on ``dataset`` (features cached beforehand) and its statistics."""
    cache = FeatureCache(extractor, cache_dir)
    cache.precompute(dataset)
    def batches():
        for batch in make_dataloader(dataset, 1):
            f2d, f3d = cache.features(batch)
            yield f2d, f3d, valid_mask(batch, f3d, extractor), batch.xyz

    start = _clock(extractor.device)
    with torch.no_grad():
        statistics = model.fit(batches())
    return {"fit_seconds": _clock(extractor.device) - start, **statistics}


def epoch_seconds(extractor: MultimodalFeatures, model: Detector, dataset: MVTec3DDataset, cache_dir: Path | None,
                  snapshot_to: Path | None = None) -> tuple[float, float | None]:
    """Seconds of one training epoch (batch size 1), and of writing the resume state after it (modules and Adam
    moments, as train.py does) to ``snapshot_to``; with a cache directory the cache is filled beforehand."""
    training_set = TrainingSet(FeatureCache(extractor, cache_dir), dataset)
    model.train()
    optimizers = make_optimizers(model)
    start = _clock(extractor.device)
    for indices in index_loader(len(training_set), 1, shuffle=True):
        optimisation_step(model, optimizers, *training_set.features(indices))
    epoch = _clock(extractor.device) - start
    if snapshot_to is None:
        return epoch, None
    start = time.perf_counter()
    save_resume_state(snapshot_to, {"modules": {n: m.state_dict() for n, m in model.trainable().items()},
                                    "optimizers": {n: o.state_dict() for n, o in optimizers.items()}})
    return epoch, time.perf_counter() - start


def measure_training_step(model_name: str, preset: str, options: dict, batch_size: int, checkpointing: bool,
                          device: torch.device) -> tuple[float, float]:
    """Peak memory (MB) and seconds of one training step of the method's modules — forward, backward, Adam step —
    on random features of the preset's shapes, measured in a fresh process (CPU: its peak resident memory, which
    includes the ≈0.4 GB of an imported torch; CUDA: the allocator's peak)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        task = pool.submit(_training_step_peak, model_name, preset, options, batch_size, checkpointing, str(device))
        return task.result()


def _training_step_peak(model_name: str, preset: str, options: dict, batch_size: int, checkpointing: bool,
                        device_name: str) -> tuple[float, float]:
    device = torch.device(device_name)
    seed_everything(DEFAULT_SEED)
    config = extractor_config(preset, model_name)
    model = build_detector(model_name, config, **options).to(device).train()
    set_activation_checkpointing(model, checkpointing)
    pixels = config.grid_size**2
    f2d = torch.randn(batch_size, pixels, config.rgb_dim, device=device)
    f3d = torch.randn(batch_size, pixels, config.xyz_dim, device=device)
    mask = torch.ones(batch_size, pixels, dtype=torch.bool, device=device)
    optimizers = make_optimizers(model)
    start = _clock(device)
    sum(model.losses(f2d, f3d, mask).values()).backward()
    for optimizer in optimizers.values():
        optimizer.step()  # allocates Adam's moments, as every real step holds them
    seconds = _clock(device) - start
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, seconds
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds


def train_memory(args: argparse.Namespace, options: dict, device: torch.device) -> dict:
    """``--train_memory``: the training step's peak for batch sizes 1 and 2, without and with activation
    checkpointing (``train.py --activation_checkpointing``)."""
    peaks, seconds = {}, {}
    for batch_size in (1, 2):
        for checkpointing in (False, True):
            key = f"batch_{batch_size}" + ("_checkpointed" if checkpointing else "")
            try:
                peaks[key], seconds[key] = measure_training_step(args.model, args.preset, options, batch_size,
                                                                 checkpointing, device)
                outcome = f"peak {peaks[key]:.0f} MB, {seconds[key]:.1f} s"
            except (BrokenProcessPool, torch.cuda.OutOfMemoryError):  # the system's OOM killer or CUDA's
                peaks[key] = seconds[key] = None
                outcome = "did not fit in this machine's memory"
            print(f"  training step, batch size {batch_size}, activation checkpointing "
                  f"{'on' if checkpointing else 'off'}: {outcome}", flush=True)
    return {"model": args.model, "preset": args.preset, "device": str(device), "train_step_peak_memory_mb": peaks,
            "train_step_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    add_model_arguments(parser)
    parser.add_argument("--random_init", action="store_true")
    parser.add_argument("--rgb_weights", type=Path)
    parser.add_argument("--pointmae_weights", type=Path)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dataset_path", type=Path)
    parser.add_argument("--class_name")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="parts scored at once in the inference measurement (the fps is per part)")
    parser.add_argument("--train_memory", action="store_true",
                        help="only measure the peak memory of one training step (batch sizes 1 and 2, activation "
                             "checkpointing off and on), each in a fresh process, on random features")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        options = parse_model_options(args.model, model_option_pairs(args))
    except ValueError as err:
        parser.error(str(err))
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    seed_everything(DEFAULT_SEED)
    device = resolve_device(args.device)
    if args.train_memory:
        if issubclass(detector_class(args.model), MemoryBankDetector):
            parser.error(f"{args.model} is fitted, not trained: --train_memory does not apply")
        results = train_memory(args, options, device)
        if args.out:
            write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        return 0
    extractor = MultimodalFeatures(extractor_config(args.preset, args.model), random_init=args.random_init,
                                   rgb_weights=args.rgb_weights, pointmae_weights=args.pointmae_weights, device=device)
    model = build_detector(args.model, extractor.config, **options).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root, class_name = args.dataset_path, args.class_name
        if root is None:
            config = SyntheticConfig(classes=("dome",), n_train=8, n_val=0, n_test=max(8, 3 * args.batch_size),
                                     size=(400, 400), background="none")
            root, class_name = generate_dataset(Path(tmp) / "data", config), "dome"
        test = open_split(extractor, root, class_name, "test", "rgbxyz")
        train = open_split(extractor, root, class_name, "train", "rgbxyz")
        fitted = fit_seconds(extractor, model, train, Path(tmp) / "cache") \
            if isinstance(model, MemoryBankDetector) else {}
        results = {
            "model": args.model, "preset": args.preset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dataset": str(args.dataset_path or "synthetic"), "class_name": class_name, "n_test": len(test),
            "batch_size": args.batch_size, **inference_speed(extractor, model, test, args.batch_size), **fitted,
        }
        print(f"{args.model}, preset {args.preset}, batch {args.batch_size} on {results['device_name']}: "
              f"{results['fps']:.2f} FPS, "
              f"peak memory {results['peak_memory_mb']:.0f} MB", flush=True)
        roofline = results["roofline"]
        rates = ", ".join(f"{dtype} {rate:.0f}" for dtype, rate in roofline["matmul_gflops_per_second"].items()
                          if rate is not None)
        print(f"  matmul rate of this process (GFLOP/s): {rates}", flush=True)
        for name, seconds in results["stages"].items():
            stage = roofline["stages"][name]
            print(f"  {name:<18} {1000 * seconds:9.1f} ms/sample  {stage['gflop']:9.3f} GFLOP  "
                  f"{100 * stage['fraction_of_fp32_matmul_rate']:6.1f} % of the fp32 matmul rate", flush=True)
        if extractor.rgb_backbone is not None and extractor.xyz_backbone is not None:
            results["branch_seconds"] = branch_seconds(extractor, test)
            rgb, xyz = results["branch_seconds"]["rgb"], results["branch_seconds"]["xyz"]
            print(f"  features by branch, each alone: RGB backbone {1000 * rgb:.1f} ms, 3D branch "
                  f"{1000 * xyz:.1f} ms ({xyz / rgb:.2f} × the RGB backbone)", flush=True)
        results["n_train"] = len(train)
        results["predictor_seconds_per_part"] = predictor_seconds(extractor, model, test)
        print(f"  predictor (files → score, decision, native-resolution map; batch 1): "
              f"{1000 * results['predictor_seconds_per_part']:.1f} ms/part", flush=True)
        if fitted:
            banks = ", ".join(f"{k} {v:.4g}" for k, v in fitted.items() if k not in ("fit_seconds", "bank_megabytes"))
            print(f"  fit ({results['n_train']} samples, features cached): {fitted['fit_seconds']:.2f} s; memory "
                  f"banks {fitted['bank_megabytes']:.1f} MB ({banks})")
        else:
            snapshot = Path(tmp) / "resume.pth"
            results["train_epoch_seconds_cached"], results["snapshot_seconds"] = epoch_seconds(
                extractor, model, train, Path(tmp) / "cache", snapshot)
            results["snapshot_megabytes"] = snapshot.stat().st_size / 2**20
            results["train_epoch_seconds_uncached"] = epoch_seconds(extractor, model, train, None)[0]
            print(f"  training epoch ({results['n_train']} samples): {results['train_epoch_seconds_cached']:.2f} s "
                  f"cached, {results['train_epoch_seconds_uncached']:.2f} s uncached; resume state "
                  f"{results['snapshot_megabytes']:.0f} MB written in {results['snapshot_seconds']:.2f} s "
                  f"({results['snapshot_seconds'] / results['train_epoch_seconds_cached']:.2f} × a cached epoch: "
                  "space snapshots with train.py --snapshot_epochs when that is large)")
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
