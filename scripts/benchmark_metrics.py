"""Time the metrics on a class-sized test set (default: 250 maps of 224x224) and print the numbers.

    python scripts/benchmark_metrics.py [--n_maps 250] [--size 224] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


from utils.evaluation.metrics import PAPER_NUM_THRESHOLDS, calculate_au_pro, image_auroc, pixel_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_maps", type=int, default=250)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    gts, maps, labels = [], [], []
    for i in range(args.n_maps):
        gt = np.zeros((args.size, args.size), dtype=bool)
        if i % 3:  # two thirds anomalous, one rectangular region each
            y, x = rng.integers(0, args.size - 32, 2)
            gt[y : y + rng.integers(4, 32), x : x + rng.integers(4, 32)] = True
        gts.append(gt)
        maps.append((gt * 1.0 + rng.normal(0, 0.5, gt.shape)).astype(np.float32))
        labels.append(int(gt.any()))

    timings = {}
    for name, run in {
        "AUPRO exact": lambda: calculate_au_pro(gts, maps),
        f"AUPRO {PAPER_NUM_THRESHOLDS} thresholds": lambda: calculate_au_pro(gts, maps, num_thresholds=PAPER_NUM_THRESHOLDS),
        "P-AUROC": lambda: pixel_auroc(gts, maps),
        "I-AUROC": lambda: image_auroc(labels, [m.max() for m in maps]),
    }.items():
        start = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - start
    print(f"{args.n_maps} maps of {args.size}x{args.size}:")
    for name, seconds in timings.items():
        print(f"  {name:<24} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
