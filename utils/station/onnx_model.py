"""One ONNX file per trained run (``export.py``) and scoring parts with it in onnxruntime (``predict.py --onnx``)
(docs/inspecting.md, "One file for the line").

The file holds :class:`networks.graph.DetectorGraph` — the frozen extractors, the method's trained modules and its
fusion — with a dynamic batch axis, and under the metadata key :data:`METADATA_KEY` (JSON) everything needed to feed
and read it: the run's identity, its inputs and outputs, the image size, the image normalisation, the cloud's units
and missing-point rule, the calibrated threshold, and the exporter's own check against PyTorch. onnx and
onnxruntime are optional (``pip install -r requirements-export.txt``).
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from networks.extractors.geometry_images import check_enough_points
from networks.graph import GRAPH_INPUTS, GRAPH_OUTPUTS, DetectorGraph
from networks.normalization import Normalization
from utils.data.io import InputError, atomic_path
from utils.data.mvtec3d import Batch
from utils.runs.pipeline import model_identity, valid_pixels
from utils.station.predictor import PartScorer, Predictor

logger = logging.getLogger(__name__)

METADATA_KEY = "cmdr_iad"
FORMAT_VERSION = 1
OPSET = 18
# the exported graph must give PyTorch's maps and scores to this (the export refuses to write a file otherwise)
EXPORT_TOLERANCE = 1e-4
CLOUD_CONVENTION = ("organised (H, W, 3) cloud in the units of the training data (MVTec 3D-AD: metres); a missing "
                    "point is (0, 0, 0); resized to S x S by nearest neighbour after padding to a square")


class ExportError(InputError):
    """An export that cannot be written (missing package, a graph that disagrees with PyTorch)."""


def require(package: str) -> ModuleType:
    """Import an optional export package, or raise :class:`ExportError` saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ExportError(f"{package} is not installed ({err}): pip install -r requirements-export.txt") from err


def example_inputs(graph: DetectorGraph, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes to trace ``graph`` with (a batch of 2: a batch of 1 would be fixed as 1): images
    of a fixed seed, a tilted plane 0.5 m from the camera as every cloud, every pixel valid."""
    size = graph.extractor.img_size
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.linspace(-0.05, 0.05, size), torch.linspace(-0.05, 0.05, size), indexing="ij")
    plane = torch.stack((cols, rows, 0.5 + 0.2 * cols + 0.1 * rows))
    made = {"image": torch.randn(batch, 3, size, size, generator=generator),
            "cloud": plane.expand(batch, -1, -1, -1).contiguous(), "valid": torch.ones(batch, size, size)}
    return tuple(made[name] for name in graph.input_names)


def export_onnx(predictor: Predictor, out: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Write ``predictor``'s run as one ONNX file at ``out`` (atomically) and return the metadata written with it.

    Raises:
        networks.graph.NotExportableError: the method or its 3D branch is not one graph.
        ExportError: onnx / onnxruntime missing, or the graph disagrees with PyTorch by more than
            :data:`EXPORT_TOLERANCE` (nothing is written then).
    """
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter writes the graph with it
    graph = DetectorGraph(predictor.extractor.cpu(), predictor.model.cpu())
    inputs = example_inputs(graph)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        # both inputs' batch axes are one Dim; torch.onnx says so in a warning that alarms without cause
        warnings.filterwarnings("ignore", message="# The axis name")
        expected = [t.numpy() for t in graph(*inputs)]
        program = torch.onnx.export(graph, inputs, dynamo=True, input_names=list(graph.input_names),
                                    output_names=list(GRAPH_OUTPUTS), opset_version=opset, external_data=False,
                                    dynamic_shapes=(tuple({0: batch} for _ in inputs),), verbose=False)
    proto = program.model_proto
    runtime = require("onnxruntime")
    session = runtime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(list(GRAPH_OUTPUTS), {n: t.numpy() for n, t in zip(graph.input_names, inputs)})
    check = {f"max_abs_{name}_difference": float(np.abs(a - b).max()) for name, a, b in zip(GRAPH_OUTPUTS, got,
                                                                                              expected)}
    if max(check.values()) > EXPORT_TOLERANCE:
        raise ExportError(f"the exported graph disagrees with PyTorch ({check}; tolerance {EXPORT_TOLERANCE}): "
                          f"nothing written to {out}")
    metadata = _metadata(predictor, graph, opset, check)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return metadata


def _metadata(predictor: Predictor, graph: DetectorGraph, opset: int, check: dict[str, float]) -> dict[str, Any]:
    size = predictor.img_size
    shapes = {"image": ["batch", 3, size, size], "cloud": ["batch", 3, size, size], "valid": ["batch", size, size]}
    run_dir, epochs, batch_size = predictor.run or (None, None, None)
    return {
        "format_version": FORMAT_VERSION,
        "class_name": predictor.class_name,
        "model": predictor.method,
        "modality": predictor.modality,
        "preset": predictor.sidecar.get("preset"),
        "identity": model_identity(predictor.extractor, predictor.model),
        "run": {"checkpoint_folder": None if run_dir is None else str(run_dir), "epochs_no": epochs,
                "batch_size": batch_size, "seed": predictor.sidecar.get("seed")},
        "inputs": {name: shapes[name] for name in graph.input_names},
        "outputs": {"anomaly_map": ["batch", size, size], "score": ["batch"]},
        "img_size": size,
        "normalization": {"mean": list(predictor.normalization.mean), "std": list(predictor.normalization.std)},
        "image": "RGB, resized to S x S bilinearly after padding to a square, then (x / 255 - mean) / std",
        "cloud": CLOUD_CONVENTION,
        "valid": "1 on the pixels to score: the cloud's points where there is a cloud, else the image's own area",
        "calibration": predictor.calibration,
        "exporter": {"torch": torch.__version__, "opset": opset},
        "export_check": check,
    }


class OnnxPredictor(PartScorer):
    """Scores parts with a file written by :func:`export_onnx`, in onnxruntime (CPU, or CUDA where onnxruntime has
    it): the same reading, checks, thresholds and results as :class:`utils.station.predictor.Predictor`.

    Use :meth:`load`.
    """

    def __init__(self, session: Any, metadata: dict[str, Any]) -> None:
        normalization = metadata["normalization"]
        super().__init__(metadata["model"], metadata["modality"], int(metadata["img_size"]),
                         Normalization(tuple(normalization["mean"]), tuple(normalization["std"])),
                         metadata["class_name"], metadata.get("calibration"))
        self.session, self.metadata = session, metadata
        self.input_names = GRAPH_INPUTS[self.modality]

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> OnnxPredictor:
        """Open an exported file.

        Raises:
            InputError: no such file, not an ONNX file, not written by export.py, or ``device`` ``cuda`` without
                onnxruntime's CUDA provider.
            ExportError: onnxruntime is not installed.
        """
        runtime = require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file; write one with python export.py --checkpoint_folder RUN "
                             f"--class_name C --out {path}")
        available = runtime.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise InputError(f"--device cuda: this onnxruntime has no CUDA provider (it has {available}); install "
                             "onnxruntime-gpu or use --device cpu")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        options = runtime.SessionOptions()
        # onnxruntime's worker threads spin after every run by default: between parts that spin takes the cores
        # from the file reading and map resizing around the network (docs/performance.md, ONNX)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = runtime.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a damaged or foreign file
            raise InputError(f"{path} is not a readable ONNX file ({type(err).__name__}: {err}); export the run "
                             "again with export.py") from err
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise InputError(f"{path} was not written by export.py (no {METADATA_KEY!r} metadata): export the run "
                             "with python export.py")
        metadata = json.loads(text)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path} has export format {metadata.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}: export the run again with this version's export.py")
        logger.info("%s: %s (%s) for %s on %s", path, metadata["model"], metadata["modality"],
                    metadata["class_name"], session.get_providers()[0])
        return cls(session, metadata)

    def score_batch(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and maps (B, S, S) of a batch of network inputs."""
        feeds = {}
        if "image" in self.input_names:
            feeds["image"] = batch.rgb.numpy()
        if "cloud" in self.input_names:
            check_enough_points((batch.xyz != 0).all(dim=1))  # the clouds are geometry images' (export_problem)
            feeds["cloud"] = batch.xyz.numpy()
        if "valid" in self.input_names:
            feeds["valid"] = valid_pixels(batch).float().numpy()
        maps, scores = self.session.run(list(GRAPH_OUTPUTS), feeds)
        return scores, maps

