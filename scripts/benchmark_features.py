"""Per-stage timings and peak memory of the frozen feature extraction for one sample.

    python scripts/benchmark_features.py [--preset paper|tiny] [--random_init] [--device cpu|cuda]
        [--rgb_weights F] [--pointmae_weights F] [--repeats 3]

The sample is a generated scene (utils.data.synthetic) with the table kept, so ~95% of the S² pixels are valid
points (≈ 48k at 224², the size of an MVTec 3D-AD cloud before background removal). Stages: ViT, FPS, kNN
grouping, Point-MAE encoder, 3-NN propagation weights, propagation + scatter + pooling. Prints the median over
``--repeats`` runs per stage, and the peak memory (CUDA: allocator peak; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


from networks.extractors.point_ops import farthest_point_sample, knn_groups, three_nn_weights
from networks.features import MultimodalFeatures, XYZParts
from utils.data.synthetic import render_sample, sample_rng
from utils.data.transforms import rgb_to_tensor, xyz_to_tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--random_init", action="store_true")
    parser.add_argument("--rgb_weights")
    parser.add_argument("--pointmae_weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    extractor = MultimodalFeatures(args.preset, random_init=args.random_init, rgb_weights=args.rgb_weights,
                                   pointmae_weights=args.pointmae_weights, device=device)
    size = extractor.img_size
    scene = render_sample("dome", sample_rng(0, "dome", "test", "good", 0), size=(600, 800))
    rgb = rgb_to_tensor(scene.rgb, size)[None].to(device)
    cloud = xyz_to_tensor(scene.xyz, size)[None].to(device)
    points = cloud[0].reshape(3, -1).T
    pixel_index = torch.nonzero((points != 0).all(dim=1)).squeeze(1)
    points = points[pixel_index]
    cfg = extractor.config.xyz
    encoder = extractor.xyz_backbone
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timings: dict[str, list[float]] = {}

    def timed(name: str, fn):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        timings.setdefault(name, []).append(time.perf_counter() - start)
        return out

    with torch.no_grad():
        for _ in range(args.repeats):
            tokens = timed("ViT (tokens)", lambda: extractor.extract_rgb_parts(rgb))
            timed("RGB upsampling", lambda: extractor.rgb_maps(tokens))
            centre_idx = timed("FPS", lambda: farthest_point_sample(points, cfg.num_group))
            centres = points[centre_idx]
            group_idx = timed("kNN grouping", lambda: knn_groups(points, centres, cfg.group_size))
            groups = points[group_idx] - centres[:, None]
            features = timed("Point-MAE encoder", lambda: encoder(groups, centres))
            nn_idx, nn_w = timed("3-NN weights", lambda: three_nn_weights(points, centres))
            parts = [XYZParts(features, pixel_index, nn_idx, nn_w)]
            timed("propagation + pooling", lambda: extractor.xyz_maps(parts))

    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB (CUDA allocator)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (process peak RSS)"
    print(f"preset {args.preset}, device {device}, {size}x{size} input, {len(points)} valid points, "
          f"{cfg.num_group} groups x {cfg.group_size} points, median of {args.repeats}")
    for name, values in timings.items():
        print(f"  {name:<24} {1000 * statistics.median(values):9.1f} ms")
    print(f"  {'total':<24} {1000 * sum(statistics.median(v) for v in timings.values()):9.1f} ms")
    print(f"  peak memory: {peak}")


if __name__ == "__main__":
    main()
