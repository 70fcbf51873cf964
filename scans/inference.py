"""Evaluate a trained scan model on the test chunks.

    python -m scans.inference --data DATA_DIR --checkpoint FILE --results_dir R --run_name N [--save_maps]
        [--preset paper|lite|tiny] [--random_init] [--pointmae_weights F] [--device auto|cpu|cuda]

Writes ``R/N/metrics.json`` with ``I-AUROC`` (chunks), ``P-AUROC`` (all points of the test chunks against the
detector's masks), ``AUPRO@30%`` (on the S×S layout), ``n_test``, ``n_anomalous`` and ``fps`` (the whole pipeline
per chunk: frozen features, decoder, scoring). ``--save_maps`` adds one PNG per test chunk: a top view of its
points coloured by anomaly score, beside the points the detector flagged. The labels are the outlier detector's
output: the metrics measure agreement with that detector, not with human inspection.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from scans.model import build_decoder, chunk_parts, chunk_scores
from scans.train import add_model_arguments, load_data_and_extractor, sidecar_of
from utils.data.io import InputError, atomic_path, write_text_atomic
from utils.evaluation.metrics import calculate_au_pro, image_auroc, pixel_auroc
from utils.evaluation.results import json_safe
from utils.evaluation.visualization import colormap
from utils.runs.checkpoints import CheckpointError, adopt_recorded_settings
from utils.runs.pipeline import setup_logging

logger = logging.getLogger("scans.inference")
TOP_VIEW = 256


def top_view(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(TOP_VIEW, TOP_VIEW, 3) image of points (x, y in [−1, 1]) seen from above, coloured by ``values`` in [0, 1];
    higher points drawn last."""
    image = np.full((TOP_VIEW, TOP_VIEW, 3), 32, dtype=np.uint8)
    order = np.argsort(points[:, 2])
    cols = ((points[order, 0] + 1) / 2 * (TOP_VIEW - 1)).round().astype(int)
    rows = ((1 - (points[order, 1] + 1) / 2) * (TOP_VIEW - 1)).round().astype(int)
    image[rows, cols] = colormap(values[order])
    return image


def save_chunk_map(path: Path, points: np.ndarray, scores: np.ndarray, flagged: np.ndarray, title: str) -> None:
    panel = Image.new("RGB", (2 * TOP_VIEW, TOP_VIEW + 16), "white")
    panel.paste(Image.fromarray(top_view(points, scores)), (0, 16))
    panel.paste(Image.fromarray(top_view(points, flagged.astype(float))), (TOP_VIEW, 16))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 2), f"{title}   left: anomaly score   right: detector's outliers", fill="black")
    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, from_checkpoint=True)
    parser.add_argument("--results_dir", type=Path, default=Path("results"))
    parser.add_argument("--run_name", default="scans")
    parser.add_argument("--save_maps", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if not args.checkpoint.is_file():
            raise CheckpointError(f"{args.checkpoint} not found: train it with `python -m scans.train`")
        sidecar = json.loads(sidecar_of(args.checkpoint).read_text()) if sidecar_of(args.checkpoint).is_file() else {}
        adopt_recorded_settings(args, sidecar, sidecar_of(args.checkpoint),
                                defaults={"preset": "paper", "random_init": False})
        data, data_config, extractor = load_data_and_extractor(args)
        expected = {"preset": args.preset, "chunk_size": data_config.chunk_size,
                    "feature_fingerprint": extractor.fingerprint("xyz")}
        wrong = {k: (sidecar[k], v) for k, v in expected.items() if k in sidecar and sidecar[k] != v}
        if wrong:
            raise CheckpointError(f"{args.checkpoint} was trained for another configuration: {wrong} (checkpoint, "
                                  "now)")
        decoder = build_decoder(extractor)
        decoder.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    except InputError as err:  # the data, checkpoint, weights or settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    decoder.to(extractor.device).eval()
    test = data.subset("test")
    start = time.perf_counter()
    maps, scores = [], []
    for index in test:  # the whole pipeline per chunk, features included, for an honest FPS
        part = chunk_parts(extractor, data.chunks[index : index + 1])
        chunk_map, chunk_score = chunk_scores(decoder, extractor, part)
        maps.append(chunk_map[0])
        scores.append(float(chunk_score[0]))
    seconds = time.perf_counter() - start
    side = extractor.img_size
    gts = [data.masks[i].reshape(side, side) for i in test]
    labels = data.labels[test]
    aupro, _ = calculate_au_pro(gts, maps, [0.3])
    metrics = {"I-AUROC": image_auroc(labels, scores), "P-AUROC": pixel_auroc(gts, maps), "AUPRO@30%": aupro[0],
               "n_test": len(test), "n_anomalous": int(labels.sum()), "fps": len(test) / seconds,
               "config": {**vars(args), "dataset": json.loads((args.data / "dataset.json").read_text())["config"]}}
    run_dir = args.results_dir / args.run_name
    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False)
    write_text_atomic(run_dir / "metrics.json", text + "\n")
    if args.save_maps:
        scale = max(max(scores), 1e-12)
        for position, index in enumerate(test):
            name = f"{data.scan_names[data.scan[index]]}_{data.offset[index]:07d}"
            save_chunk_map(run_dir / "maps" / f"{name}.png", data.chunks[index], maps[position].ravel() / scale,
                           data.masks[index], f"{name} label {data.labels[index]} score {scores[position]:.3f}")
    logger.info("I-AUROC %.3f  P-AUROC %.3f  AUPRO@30%% %.3f  %.1f FPS  -> %s", metrics["I-AUROC"],
                metrics["P-AUROC"], metrics["AUPRO@30%"], metrics["fps"], run_dir / "metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
