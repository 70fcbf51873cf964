"""The 3D-only model of the scan pipeline: frozen 3D features of a chunk laid out as an image, and Decoder3D.

A chunk of K = S² points (9216 → 96×96, 4096 → 64×64) is laid out row-major as an S×S organized cloud; the
frozen Point-MAE encoder (group size 32, 96 groups) gives per-group features that are propagated to the points and
pooled exactly as for MVTec 3D-AD (networks.features), and Decoder3D(out_seq_len=K) reconstructs them. With the
``lite`` preset the features are FPFH of the chunk's points (no weights). Nothing is copied: the encoder, the point
operations, the cache of frozen parts and the decoder are those of ``networks``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from networks.blocks.fusion import box_filter
from networks.extractors.fpfh import FPFHConfig
from networks.extractors.geometry_images import GeometryImagesConfig
from networks.features import (
    PRESETS, ExtractorConfig, GridParts, MultimodalFeatures, PointParts, XYZParts, parts_from_tensors, parts_to_tensors,
)
from networks.methods.cmdr import build_module, feature_distance
from scans.build_dataset import ScanDataError
from utils.data.io import save_torch_atomic

logger = logging.getLogger(__name__)

NORMALISATION_EPS = 1e-6
# Version of the chunk features in the scan cache's file names: 2 = every point of a chunk is valid (version 1
# dropped points with a normalised coordinate of exactly 0, e.g. the middle line of a line-scan chunk).
SCAN_FEATURES_VERSION = 3  # 3: entries stored as named tensors (any kind of parts)


def scan_extractor_config(preset: str, chunk_size: int, organised: bool = False) -> ExtractorConfig:
    """The preset's Point-MAE with the scan grouping (paper: 96 groups of 32 points) at the chunk's layout; for
    FPFH, one feature per point of the layout.

    Geometry images (``lite``) need a layout whose neighbours are neighbours on the surface: with ``organised``
    chunks (each row one whole scan line, ``scans.build_dataset --line_points``) they are computed on the S × S
    layout; otherwise the layout is an artefact of the file order and the chunk gets FPFH, which needs no grid
    (the preset's own FPFH settings where it concatenates FPFH, else ``FPFHConfig(grid_stride=2)``).
    """
    base = PRESETS[preset]
    side = int(round(chunk_size**0.5))
    if isinstance(base.xyz, GeometryImagesConfig):
        xyz = base.xyz if organised else (base.xyz.fpfh or FPFHConfig(grid_stride=2))
        return dataclasses.replace(base, img_size=side, feature_size=None, xyz=xyz)
    if isinstance(base.xyz, FPFHConfig):
        return dataclasses.replace(base, img_size=side, feature_size=None)
    groups = (96, 32) if preset == "paper" else (32, 16)
    return dataclasses.replace(base, img_size=side, xyz=dataclasses.replace(base.xyz, num_group=groups[0],
                                                                            group_size=groups[1]))


def build_extractor(preset: str, chunk_size: int, random_init: bool, pointmae_weights: Path | None,
                    device: torch.device, organised: bool = False) -> MultimodalFeatures:
    return MultimodalFeatures(scan_extractor_config(preset, chunk_size, organised), random_init=random_init,
                              pointmae_weights=pointmae_weights, device=device, modality="xyz")


def build_decoder(extractor: MultimodalFeatures) -> torch.nn.Module:
    """Decoder3D(out_seq_len=chunk size, feature_dim=C3) of networks.blocks.decoders."""
    return build_module("Dec3D", extractor.config)


def organized(chunks: np.ndarray) -> torch.Tensor:
    """(B, K, 3) chunks → (B, 3, S, S) organized clouds (row-major layout)."""
    batch, k, _ = chunks.shape
    side = int(round(k**0.5))
    points = torch.from_numpy(np.ascontiguousarray(chunks, dtype=np.float32))
    return points.transpose(1, 2).reshape(batch, 3, side, side)


def chunk_parts(extractor: MultimodalFeatures, chunks: np.ndarray, cache_dir: Path | None = None
                ) -> list[XYZParts | PointParts | GridParts]:
    """Frozen parts of every chunk; with ``cache_dir`` stored once per (chunks, extractor) and read afterwards."""
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(np.ascontiguousarray(chunks).tobytes()).hexdigest()[:16]
        name = f"scan_features_v{SCAN_FEATURES_VERSION}_{extractor.fingerprint('xyz')[:16]}_{digest}.pt"
        path = Path(cache_dir) / name
        if path.is_file():
            try:
                return [parts_from_tensors(p) for p in torch.load(path, map_location="cpu", weights_only=True)]
            except Exception as err:  # truncated or corrupt: recompute
                logger.warning("%s: unreadable feature cache (%s); recomputing", path, err)
    side = int(round(chunks.shape[1] ** 0.5))
    # A chunk holds measured points only: none is missing, whatever its normalised coordinates (a line scanner's
    # middle line sits at y = 0).
    every_point = torch.ones(1, side, side, dtype=torch.bool)
    parts = []
    for i in range(len(chunks)):
        try:
            parts += extractor.extract_xyz_parts(organized(chunks[i : i + 1]), every_point)
        except ValueError as err:  # e.g. fewer points than the encoder's groups
            raise ScanDataError(f"chunk {i}: {err}") from None
    parts = [part.to("cpu") for part in parts]
    if path is not None:
        save_torch_atomic(path, [parts_to_tensors(p) for p in parts])
    return parts


def chunk_scores(decoder: torch.nn.Module, extractor: MultimodalFeatures,
                 parts: list[XYZParts | PointParts | GridParts]) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps and chunk scores: d = ‖normalize(pred) − normalize(feature)‖ per point on valid points, one 5×5
    box pass, divided by sqrt(mean of the non-zero values + 1e-6); chunk score = max.

    Returns:
        (maps (B, S, S), scores (B,)).
    """
    side = extractor.img_size
    with torch.no_grad():
        f3d = extractor.xyz_maps(parts)
        mask = (f3d != 0).any(dim=-1)
        distance = feature_distance(decoder(f3d), f3d, mask).reshape(-1, side, side)
        smoothed = box_filter(distance, 5, 1)
        nonzero = smoothed != 0
        mean = (smoothed.sum(dim=(1, 2)) / nonzero.sum(dim=(1, 2)).clamp(min=1))[:, None, None]
        maps = smoothed / torch.sqrt(mean + NORMALISATION_EPS)
    return maps.cpu().numpy(), maps.amax(dim=(1, 2)).cpu().numpy()
