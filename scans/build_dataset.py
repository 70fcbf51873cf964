"""Pseudo-labelled chunks from raw scans (docs/scans.md).

    python -m scans.build_dataset SCANS_DIR --out DATA_DIR [--detector iso|lof|hybrid] [--level low|high]
        [--chunk_size 9216|4096] [--tau 0.0025] [--split_by_scan] [--seed 42] [--line_points N]

1. An outlier detector on each scan's raw xyz flags points: IsolationForest (200 trees, contamination γ,
   random_state 42), LocalOutlierFactor (30 neighbours, contamination γ) or their union; γ = 1e-4 (low) or 1.5e-4
   (high).
2. Each scan is cut, in file order, into consecutive chunks of ``chunk_size`` points (the shorter tail is dropped);
   a chunk is anomalous iff at least ``tau`` of its points are flagged.
3. Normal chunks are split 90/10 into train/test (``train_test_split(test_size=0.1, random_state=42)``); every
   anomalous chunk goes to test. ``--split_by_scan`` instead puts whole scans into test, so no test chunk is a
   neighbour of a training chunk (the reference's split leaks spatially); anomalous chunks of training scans are
   then left out.
4. Each chunk is min–max normalised per axis to [−1, 1].

Writes ``DATA_DIR/scan_chunks.npz`` (chunks, labels, point masks, split, scan index, offset) and
``DATA_DIR/dataset.json`` (configuration and counts).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.model_selection import train_test_split
from sklearn.neighbors import LocalOutlierFactor
from tqdm import tqdm

from scans.readers import SUPPORTED_SUFFIXES, ScanFormatError, read_points
from utils.data.io import InputError, atomic_path, write_text_atomic
from utils.logs import setup_logging

logger = logging.getLogger("scans.build_dataset")

CONTAMINATION = {"low": 1e-4, "high": 1.5e-4}
DETECTORS = ("iso", "lof", "hybrid")
CHUNKS_FILE = "scan_chunks.npz"
DATASET_FILE = "dataset.json"


class ScanDataError(InputError, ValueError):
    """The scans cannot make a chunk dataset with these settings, or a chunk dataset is missing."""


@dataclass(frozen=True)
class ScanDatasetConfig:
    detector: str = "iso"
    level: str = "low"
    chunk_size: int = 9216
    tau: float = 0.0025
    split_by_scan: bool = False
    seed: int = 42
    line_points: int | None = None  # points per scan line when the files are rasters of lines (profilometers)

    @property
    def organised(self) -> bool:
        """Whether a chunk's S × S layout is a grid of the surface: each of its rows one whole scan line."""
        return self.line_points == int(round(self.chunk_size**0.5))

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS or self.level not in CONTAMINATION:
            raise ScanDataError(f"detector must be one of {DETECTORS} and level one of {tuple(CONTAMINATION)}")
        side = int(round(self.chunk_size**0.5))
        if side * side != self.chunk_size or self.chunk_size % 32:
            raise ScanDataError("chunk_size must be a square divisible by 32 (9216 = 96², 4096 = 64²), got "
                                f"{self.chunk_size}")


@dataclass
class ScanChunks:
    """Chunks of a scan dataset. chunks (M, K, 3) float32 in [−1, 1]; labels (M,); masks (M, K) bool (flagged
    points); split (M,) 'train'/'test'; scan (M,) index into ``scan_names``; offset (M,) first point in its scan."""

    chunks: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    split: np.ndarray
    scan: np.ndarray
    offset: np.ndarray
    scan_names: list[str]

    def subset(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def outlier_mask(points: np.ndarray, detector: str, contamination: float, seed: int = 42) -> np.ndarray:
    """Points flagged by the detector (True = outlier)."""
    flagged = np.zeros(len(points), dtype=bool)
    if detector in ("iso", "hybrid"):
        forest = IsolationForest(n_estimators=200, contamination=contamination, random_state=seed)
        flagged |= forest.fit_predict(points) == -1
    if detector in ("lof", "hybrid"):
        flagged |= LocalOutlierFactor(n_neighbors=30, contamination=contamination).fit_predict(points) == -1
    return flagged


def normalise_chunk(chunk: np.ndarray) -> np.ndarray:
    """Per-axis min–max normalisation to [−1, 1] (a constant axis becomes 0)."""
    low, high = chunk.min(axis=0), chunk.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, 2.0 * (chunk - low) / span - 1.0, 0.0)


def split_chunks(labels: np.ndarray, scan: np.ndarray, config: ScanDatasetConfig) -> np.ndarray:
    """'train' / 'test' / 'unused' per chunk."""
    split = np.full(len(labels), "test", dtype=object)
    normal = np.flatnonzero(labels == 0)
    if not config.split_by_scan:
        if len(normal) < 2:
            raise ScanDataError("fewer than 2 normal chunks: nothing to train on")
        train, _ = train_test_split(normal, test_size=0.1, random_state=config.seed)
        split[train] = "train"
        return split.astype(str)
    scans = np.unique(scan)
    rng = np.random.default_rng(config.seed)
    test_scans, n_test = [], 0
    for s in rng.permutation(scans):  # whole scans to test until they hold 10% of the normal chunks
        if n_test >= 0.1 * len(normal) and test_scans:
            break
        test_scans.append(s)
        n_test += int(np.sum((scan == s) & (labels == 0)))
    if len(test_scans) == len(scans):
        raise ScanDataError("--split_by_scan needs at least 2 scans")
    in_test = np.isin(scan, test_scans)
    split[~in_test & (labels == 0)] = "train"
    split[~in_test & (labels == 1)] = "unused"
    return split.astype(str)


def build(scans_dir: Path, out_dir: Path, config: ScanDatasetConfig) -> ScanChunks:
    files = sorted(p for p in Path(scans_dir).iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise ScanFormatError(f"{scans_dir}: no scan files ({', '.join(SUPPORTED_SUFFIXES)})")
    chunks, masks, labels, scan_index, offsets = [], [], [], [], []
    contamination = CONTAMINATION[config.level]
    for index, path in enumerate(tqdm(files, desc="scans", unit="scan")):
        points = read_points(path)
        if config.line_points and len(points) % config.line_points:
            raise ScanDataError(f"{path}: {len(points)} points are not whole scan lines of --line_points "
                                f"{config.line_points}; check the line length or leave the option out")
        flagged = outlier_mask(points, config.detector, contamination, config.seed)
        n_chunks = len(points) // config.chunk_size
        if n_chunks == 0:
            logger.warning("%s: %d points, fewer than one chunk of %d; skipped", path, len(points), config.chunk_size)
        for c in range(n_chunks):
            part = slice(c * config.chunk_size, (c + 1) * config.chunk_size)
            chunks.append(normalise_chunk(points[part]).astype(np.float32))
            masks.append(flagged[part])
            labels.append(int(flagged[part].mean() >= config.tau))
            scan_index.append(index)
            offsets.append(c * config.chunk_size)
    if not chunks:
        raise ScanDataError(f"{scans_dir}: no scan holds a whole chunk of {config.chunk_size} points")
    labels_array, scan_array = np.array(labels), np.array(scan_index)
    data = ScanChunks(np.stack(chunks), labels_array, np.stack(masks), split_chunks(labels_array, scan_array, config),
                      scan_array, np.array(offsets), [p.name for p in files])
    save(data, out_dir, config)
    return data


def save(data: ScanChunks, out_dir: Path, config: ScanDatasetConfig) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, chunks=data.chunks, labels=data.labels, masks=data.masks, split=data.split,
                        scan=data.scan, offset=data.offset, scan_names=np.array(data.scan_names))
    with atomic_path(Path(out_dir) / CHUNKS_FILE) as tmp:
        tmp.write_bytes(buffer.getvalue())
    counts = {s: {"chunks": int(np.sum(data.split == s)),
                  "anomalous": int(np.sum((data.split == s) & (data.labels == 1)))}
              for s in ("train", "test", "unused")}
    summary = {"config": asdict(config), "scans": data.scan_names, "counts": counts,
               "labels": "agreement with the outlier detector, not human inspection"}
    write_text_atomic(Path(out_dir) / DATASET_FILE, json.dumps(summary, indent=2) + "\n")
    logger.info("%s: train %d chunks, test %d (%d anomalous), unused %d", out_dir, counts["train"]["chunks"],
                counts["test"]["chunks"], counts["test"]["anomalous"], counts["unused"]["chunks"])


def load(data_dir: str | Path) -> tuple[ScanChunks, ScanDatasetConfig]:
    path = Path(data_dir) / CHUNKS_FILE
    if not path.is_file():
        raise ScanDataError(f"{path} not found: build it with "
                            f"`python -m scans.build_dataset SCANS_DIR --out {data_dir}`")
    with np.load(path, allow_pickle=False) as arrays:
        data = ScanChunks(arrays["chunks"], arrays["labels"], arrays["masks"], arrays["split"], arrays["scan"],
                          arrays["offset"], [str(s) for s in arrays["scan_names"]])
    config = ScanDatasetConfig(**json.loads((Path(data_dir) / DATASET_FILE).read_text())["config"])
    return data, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--detector", choices=DETECTORS, default="iso")
    parser.add_argument("--level", choices=tuple(CONTAMINATION), default="low")
    parser.add_argument("--chunk_size", type=int, default=9216)
    parser.add_argument("--tau", type=float, default=0.0025)
    parser.add_argument("--split_by_scan", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--line_points", type=int, default=None,
                        help="points per scan line, when every scan is a raster of lines of this many points; with "
                             "lines of the chunk's side (96 for 9216) the chunks are organised grids, and the lite "
                             "preset reads them as geometry images")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = ScanDatasetConfig(args.detector, args.level, args.chunk_size, args.tau, args.split_by_scan, args.seed,
                                   args.line_points)
        build(args.scans_dir, args.out, config)
    except InputError as err:  # the scans or the settings; anything else is a bug: traceback
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
