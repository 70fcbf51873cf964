"""Export a trained run to one ONNX file for the line (docs/inspecting.md, "One file for the line").

    python export.py --checkpoint_folder RUN --class_name C --out model.onnx [--epochs_no E] [--batch_size B]
        [--opset 18]

The file holds the frozen extractors, the method's trained modules and its fusion as one graph: inputs ``image``
and ``cloud`` (B, 3, S, S) with a dynamic batch axis (``image`` and ``valid`` for ``--modality rgb``, ``cloud``
for ``xyz``), outputs ``anomaly_map`` (B, S, S) and ``score`` (B,). Its metadata (key ``cmdr_iad``, JSON) holds the
run's identity, the calibrated threshold of calibrate.py (run it first), the image size and normalisation and the
cloud's units. Before writing, the graph is run in onnxruntime beside PyTorch; a difference above 1e-4 writes
nothing. Runs with a preset whose 3D branch is not tensor work (Point-MAE, FPFH) and memory-bank methods are
refused with the reason. ``python predict.py --onnx model.onnx --rgb ... --xyz ...`` scores parts with the file.
Needs ``pip install -r requirements-export.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from networks.graph import NotExportableError
from utils.data.io import InputError
from utils.runs.pipeline import setup_logging
from utils.station.onnx_model import OPSET, export_onnx
from utils.station.predictor import Predictor

logger = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_folder", type=Path, required=True,
                        help="the run folder train.py wrote (<savepath>/<model>_<modality>_seed<seed>)")
    parser.add_argument("--class_name", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    parser.add_argument("--epochs_no", type=int, help="the run's epochs when the folder holds several runs")
    parser.add_argument("--batch_size", type=int, help="the run's batch size when the folder holds several runs")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        predictor = Predictor.load(args.checkpoint_folder, args.class_name, "cpu", args.epochs_no, args.batch_size)
        if predictor.threshold is None:
            logger.warning("no calibrated threshold for this run: the file scores without decisions "
                           "(run calibrate.py, then export again)")
        metadata = export_onnx(predictor, args.out, args.opset)
    except (InputError, NotExportableError) as err:
        logger.error("%s", err)
        return 1
    logger.info("wrote %s (%.1f MB): %s", args.out, args.out.stat().st_size / 2**20,
                json.dumps({k: metadata[k] for k in ("model", "modality", "preset", "class_name", "export_check")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
