"""Parts per second of an exported run in onnxruntime against the eager PyTorch path, in one process.

    python scripts/benchmark_onnx.py [--checkpoint_folder data/demo/checkpoints/lite] [--class_name dome]
        [--dataset_path data/demo/dataset] [--parts 20] [--rounds 5] [--batch_sizes 1 8] [--onnx FILE]

Defaults to the demo's run (``python demo.py`` first). Exports the run (or takes ``--onnx``), then scores the same
test parts through both paths, alternating the two in every round so that the machine's noise hits both alike:

* ``network``: the tensors in, scores and maps out — :meth:`Predictor.score_batch` (PyTorch, eager) against
  :meth:`OnnxPredictor.score_batch` (onnxruntime), at each batch size;
* ``part``: a whole part as the station scores it (files read, inputs prepared, threshold, native-size map).

Prints the median parts per second of each path and their ratio, and the largest map difference on the parts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from utils.data.io import read_rgb, read_xyz
from utils.data.mvtec3d import Batch
from utils.logs import setup_logging
from utils.station.onnx_model import OnnxPredictor, export_onnx
from utils.station.predictor import PartScorer, Predictor


def stacked(batches: list[Batch]) -> Batch:
    """One batch of several parts' network inputs."""
    first = batches[0]
    return Batch(rgb=torch.cat([b.rgb for b in batches]), xyz=torch.cat([b.xyz for b in batches]),
                 gt=torch.cat([b.gt for b in batches]), label=torch.cat([b.label for b in batches]), records=[],
                 original_sizes=[s for b in batches for s in b.original_sizes]) if len(batches) > 1 else first


def parts_per_second(work: Callable[[], None], parts: int) -> float:
    start = time.perf_counter()
    work()
    return parts / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_folder", type=Path, default=Path("data/demo/checkpoints/lite"))
    parser.add_argument("--class_name", default="dome")
    parser.add_argument("--dataset_path", type=Path, default=Path("data/demo/dataset"))
    parser.add_argument("--onnx", type=Path, help="an exported file of the run (default: export it now)")
    parser.add_argument("--parts", type=int, default=20, help="test parts scored per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    setup_logging()

    predictor = Predictor.load(args.checkpoint_folder, args.class_name, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or Path(tmp) / "model.onnx"
        if args.onnx is None:
            export_onnx(predictor, path)
        runtime = OnnxPredictor.load(path, "cpu")
    files = sorted((args.dataset_path / args.class_name / "test").glob("*/rgb/*.png"))[: args.parts]
    files = [(f, f.parent.parent / "xyz" / f"{f.stem}.tiff") for f in files]
    batches = [predictor.batch(read_rgb(i), read_xyz(c))[0] for i, c in files]
    paths: dict[str, PartScorer] = {"pytorch": predictor, "onnxruntime": runtime}
    print(f"{len(files)} parts of {args.class_name}, {predictor.method} {predictor.sidecar.get('preset')}, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} rounds")

    worst = max(float(np.abs(predictor.score_batch(b)[1] - runtime.score_batch(b)[1]).max()) for b in batches)
    print(f"largest |map(onnxruntime) - map(pytorch)| on these parts: {worst:.2e}")

    cases: dict[str, Callable[[PartScorer], Callable[[], None]]] = {}
    for size in args.batch_sizes:
        groups = [stacked(batches[k : k + size]) for k in range(0, len(batches), size)]
        cases[f"network, batch {size}"] = lambda scorer, groups=groups: lambda: [scorer.score_batch(g) for g in groups]
    cases["part (files -> result)"] = lambda scorer: lambda: [scorer(rgb=i, xyz=c) for i, c in files]

    print("| case | PyTorch parts/s | onnxruntime parts/s | onnxruntime / PyTorch |\n|---|---|---|---|")
    for case, make in cases.items():
        for scorer in paths.values():  # warm-up: first-call allocations and onnxruntime's arena
            make(scorer)()
        speeds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, scorer in paths.items():
                with torch.no_grad():
                    speeds[name].append(parts_per_second(make(scorer), len(files)))
        eager, onnx = statistics.median(speeds["pytorch"]), statistics.median(speeds["onnxruntime"])
        print(f"| {case} | {eager:.2f} | {onnx:.2f} | {onnx / eager:.2f} |")


if __name__ == "__main__":
    main()
