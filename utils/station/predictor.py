"""Scoring parts one at a time with a trained run, and the calibrated pass/fail threshold (docs/inspecting.md).

:class:`Predictor` loads a trained run once — method, preset, extractor weights and options all come from the run's
sidecar — and scores a part from its files or arrays: image score, decision against the run's calibrated threshold,
and the anomaly map at the part's native resolution. A part that cannot be scored (a missing modality, an unreadable
file, a cloud without enough valid points) gets a :class:`PartResult` with its error; the predictor keeps serving.

Thresholds (:mod:`utils.station.calibration`): the score above which a part is called anomalous, chosen on good
parts (the ``validation/good`` split) for a target false-alarm rate, or on defective ones for a miss rate; stored
next to the run's sidecar as ``<class>_independent_<E>ep_<B>bs.threshold.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from networks.features import MultimodalFeatures
from networks.methods.detector import BRANCHES_OF_MODALITY, Detector
from networks.methods.registry import build_detector, detector_class, extractor_config, parse_model_options
from networks.normalization import Normalization
from utils.data.io import InputError, read_rgb, read_xyz, write_text_atomic
from utils.data.mvtec3d import Batch
from utils.data.transforms import rgb_to_tensor, to_native_resolution, xyz_to_tensor
from utils.runs.checkpoints import CheckpointError, load_modules, read_sidecar, select_run, sidecar_path
from utils.runs.pipeline import model_identity, resolve_device, valid_mask

logger = logging.getLogger(__name__)

def add_run_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that pick a trained run for the predictor (calibrate.py, predict.py)."""
    parser.add_argument("--checkpoint_folder", type=Path, required=required,
                        help="the run folder train.py wrote (<savepath>/<model>_<modality>_seed<seed>)")
    parser.add_argument("--epochs_no", type=int, help="the run's epochs when the folder holds several runs")
    parser.add_argument("--batch_size", type=int, help="the run's batch size when the folder holds several runs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def threshold_path(run_dir: Path, class_name: str, epochs: int, batch_size: int) -> Path:
    """Where a run's calibration lives: next to its sidecar."""
    return sidecar_path(run_dir, class_name, epochs, batch_size).with_suffix(".threshold.json")


@dataclass
class PartResult:
    """The verdict on one part.

    Attributes:
        name: the part's name (its file stem).
        score: the image anomaly score (None when the part could not be scored).
        decision: ``anomalous`` / ``good`` against the threshold, None without a calibrated threshold or on error.
        anomaly_map: (H, W) float32 map at the input's native resolution, or None.
        error: why the part could not be scored, or None.
        seconds: wall time of scoring the part (reading files included).
    """

    name: str
    score: float | None = None
    decision: str | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The part's line in the results (no map)."""
        return {"part": self.name, "score": self.score, "decision": self.decision, "error": self.error,
                "seconds": round(self.seconds, 4)}


class PartScorer:
    """What every way of scoring parts shares: reading a part's files, checking and preparing its network inputs,
    the threshold decision and the map at the part's native resolution. Subclasses (:class:`Predictor`, PyTorch;
    :class:`utils.station.onnx_runtime.OnnxPredictor`, an exported file) implement :meth:`score_batch`.

    Args:
        method, modality: the detector's name and modality (which inputs a part needs).
        img_size: side S of the network input; normalization: the image's mean / std.
        class_name: the class the run was trained on; calibration: its threshold record, or None.
    """

    def __init__(self, method: str, modality: str, img_size: int, normalization: Normalization, class_name: str,
                 calibration: dict | None) -> None:
        self.method, self.modality, self.img_size, self.normalization = method, modality, img_size, normalization
        self.class_name, self.calibration = class_name, calibration

    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else float(self.calibration["threshold"])

    @property
    def needs_rgb(self) -> bool:
        return "2d" in BRANCHES_OF_MODALITY[self.modality]

    @property
    def needs_xyz(self) -> bool:
        return "3d" in BRANCHES_OF_MODALITY[self.modality] or detector_class(self.method).needs_clouds

    def batch(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> tuple[Batch, tuple[int, int]]:
        """The network inputs of one part and its native (H, W)."""
        if rgb is None and self.needs_rgb:
            raise InputError(f"{self.method} ({self.modality}) needs an RGB image")
        if xyz is None and self.needs_xyz:
            raise InputError(f"{self.method} ({self.modality}) needs a point cloud (xyz)")
        if rgb is not None and xyz is not None and rgb.shape[:2] != xyz.shape[:2]:
            raise InputError(f"image {rgb.shape[1]}×{rgb.shape[0]} and cloud {xyz.shape[1]}×{xyz.shape[0]} "
                             "differ in size")
        height, width = (rgb if rgb is not None else xyz).shape[:2]
        size = self.img_size
        image = rgb if rgb is not None else np.zeros((height, width, 3), dtype=np.uint8)
        cloud = None if xyz is None else xyz_to_tensor(xyz, size)[None]  # the 2D-only model: its foreground
        if self.needs_xyz and not (cloud != 0).all(dim=1).any():
            raise InputError("the point cloud has no valid point")
        return Batch(rgb=rgb_to_tensor(image, size, self.normalization)[None], xyz=cloud,
                     gt=torch.zeros(1, 1, size, size), label=torch.zeros(1, dtype=torch.int64), records=[],
                     original_sizes=[(height, width)]), (height, width)

    def score_batch(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and maps (B, S, S) of a batch of network inputs."""
        raise NotImplementedError

    def __call__(self, rgb: str | Path | np.ndarray | None = None, xyz: str | Path | np.ndarray | None = None,
                 name: str | None = None) -> PartResult:
        """Score one part; never raises for the part's own problems (they come back in ``error``)."""
        start = time.perf_counter()
        paths = [p for p in (rgb, xyz) if isinstance(p, (str, Path))]
        name = name or (Path(paths[0]).stem if paths else "part")
        try:
            image = read_rgb(rgb) if isinstance(rgb, (str, Path)) else rgb
            cloud = read_xyz(xyz) if isinstance(xyz, (str, Path)) else xyz
            batch, native = self.batch(image, cloud)
            scores, maps = self.score_batch(batch)
        except (InputError, ValueError, OSError) as err:  # the part's problem: report it, keep serving
            return PartResult(name, error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
        score = float(scores[0])
        decision = None if self.threshold is None else ("anomalous" if score > self.threshold else "good")
        return PartResult(name, score, decision, to_native_resolution(maps[0], native),
                          seconds=time.perf_counter() - start)


class Predictor(PartScorer):
    """A trained run ready to score parts at batch size 1, in PyTorch.

    Use :meth:`load`; then ``predictor(rgb=..., xyz=...)`` with file paths or arrays ((H, W, 3) uint8 image,
    (H, W, 3) float organized cloud with invalid points (0, 0, 0)).
    """

    def __init__(self, model: Detector, extractor: MultimodalFeatures, class_name: str, sidecar: dict,
                 threshold: dict | None = None, run: tuple[Path, int, int] | None = None) -> None:
        super().__init__(model.name, model.modality, extractor.img_size, extractor.config.normalization, class_name,
                         threshold)
        self.model, self.extractor, self.sidecar = model.eval(), extractor, sidecar
        self.run = run  # (run folder, epochs, batch size) of a loaded run: where its calibration is stored

    @classmethod
    def load(cls, checkpoint_folder: str | Path, class_name: str, device: str = "auto",
             epochs_no: int | None = None, batch_size: int | None = None) -> Predictor:
        """The run of ``class_name`` in ``checkpoint_folder`` (the run folder holding ``<class>/``).

        Raises:
            CheckpointError: no run, several runs (pick with ``epochs_no``/``batch_size``), or no sidecar.
            WeightsError: the extractor weights the run was trained with are missing here.
        """
        run_dir = Path(checkpoint_folder)
        epochs, batch = select_run(run_dir, class_name, epochs_no, batch_size)
        sidecar = read_sidecar(run_dir, class_name, epochs, batch)
        if sidecar is None:
            raise CheckpointError(f"{sidecar_path(run_dir, class_name, epochs, batch)} is missing: the predictor "
                                  "takes everything from a run trained by train.py")
        model_name, modality = sidecar["model"], sidecar["modality"]
        recorded = sidecar.get("extractor", {})
        extractor = MultimodalFeatures(
            extractor_config(sidecar.get("preset", "paper"), model_name),
            random_init=recorded.get("random_init", False), rgb_weights=recorded.get("rgb_weights"),
            pointmae_weights=recorded.get("pointmae_weights"),
            bn_mode=sidecar.get("extractor_config", {}).get("bn_mode"), device=resolve_device(device),
            modality=modality)
        options = parse_model_options(model_name, sidecar.get("model_option", []))
        model = build_detector(model_name, extractor.config, modality, **options).to(extractor.device)
        load_modules(model.trainable(), run_dir, class_name, epochs, batch, expected=model_identity(extractor, model))
        path = threshold_path(run_dir, class_name, epochs, batch)
        threshold = json.loads(path.read_text()) if path.is_file() else None
        return cls(model, extractor, class_name, sidecar, threshold, (run_dir, epochs, batch))

    @torch.no_grad()
    def score_batch(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and maps (B, S, S) of a batch of network inputs."""
        device = self.extractor.device
        f2d, f3d = self.extractor.get_features_maps(batch.rgb.to(device), None if batch.xyz is None or not
                                                    self.needs_xyz else batch.xyz.to(device))
        prediction = self.model.predict(f2d, f3d, valid_mask(batch, f3d, self.extractor), xyz=batch.xyz)
        return prediction.image_scores.float().cpu().numpy(), prediction.maps.float().cpu().numpy()

    def save_calibration(self, calibration: dict) -> Path:
        """Store ``calibration`` (its ``threshold`` and statistics) with the run, atomically; returns the file."""
        if self.run is None:
            raise ValueError("this predictor was not loaded from a run folder (Predictor.load): nowhere to store")
        run_dir, epochs, batch = self.run
        path = threshold_path(run_dir, self.class_name, epochs, batch)
        write_text_atomic(path, json.dumps(calibration, indent=2, sort_keys=True) + "\n")
        self.calibration = calibration
        return path
