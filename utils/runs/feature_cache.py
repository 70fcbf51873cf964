"""On-disk cache of the frozen features (docs/features.md, "Frozen feature extractors").

The extractors are frozen, so every sample's features are computed once. An entry stores the *parts* of
:class:`networks.features.MultimodalFeatures` (RGB feature grid; per-group 3D features with propagation
indices and weights, or per-point FPFH features), from which F2D and F3D are rebuilt exactly — about 7 MB per
sample at paper size instead of the 231 MB of the 224×224×1152 map.

Layout: ``<cache_dir>/<branch>/<fingerprint[:16]>/<dataset>-<hash of its path>/<class>/<split>/<defect>/<stem>.pt``.
The fingerprint hashes the extractor configuration and weights of the branch, so a changed configuration or
weights file never reuses an entry; an entry also records the feature pipeline's version
(``networks.features.FEATURE_PIPELINE_VERSION``, bumped when code changes alter feature values) and its source
file's size and mtime, and is recomputed when either changed, or when it is truncated or unreadable. Entries are
written atomically.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from networks.features import (
    FEATURE_PIPELINE_VERSION, GridParts, MultimodalFeatures, PointParts, XYZParts, parts_from_tensors, parts_to_tensors,
)
from utils.data.io import DatasetError, save_torch_atomic
from utils.data.mvtec3d import Batch, MVTec3DDataset, SampleRecord, make_dataloader

logger = logging.getLogger(__name__)

BRANCHES = ("rgb", "xyz")
CACHE_FORMAT = 1


def _source_file(record: SampleRecord, branch: str) -> Path:
    path = record.rgb_path if branch == "rgb" else record.xyz_path
    if path is None:
        raise DatasetError(f"{record.rgb_path}: no point cloud for this sample")
    return path


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class FeatureCache:
    """Frozen features of a dataset's samples, computed on first use and read afterwards.

    Args:
        extractor: the frozen extractors; only its built branches are cached.
        cache_dir: root folder of the cache; ``None`` disables caching (features computed every time).
    """

    def __init__(self, extractor: MultimodalFeatures, cache_dir: str | Path | None) -> None:
        self.extractor = extractor
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def entry_path(self, branch: str, record: SampleRecord) -> Path:
        """Where the entry of ``record`` for ``branch`` lives."""
        if self.cache_dir is None:
            raise ValueError("caching is disabled (cache_dir=None)")
        dataset_root = record.rgb_path.parents[4].resolve()  # <root>/<class>/<split>/<defect>/rgb/<file>
        dataset_key = f"{dataset_root.name}-{hashlib.sha256(str(dataset_root).encode()).hexdigest()[:10]}"
        fingerprint = self.extractor.fingerprint(branch)[:16]
        return (self.cache_dir / branch / fingerprint / dataset_key / record.class_name / record.split
                / record.defect_type / f"{record.stem}.pt")

    # --- entries -----------------------------------------------------------------------------------------------

    def load(self, branch: str, record: SampleRecord) -> torch.Tensor | XYZParts | PointParts | GridParts | None:
        """The stored parts of ``record`` for ``branch``; None when there is no valid entry (missing, stale or
        unreadable: the warning says which)."""
        path = self.entry_path(branch, record)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            valid = (
                entry["format"] == CACHE_FORMAT
                and entry["fingerprint"] == self.extractor.fingerprint(branch)
                and entry.get("pipeline_version") == FEATURE_PIPELINE_VERSION
                and entry["source_stat"] == _stat(_source_file(record, branch))
            )
        except Exception as err:  # truncated or corrupt file
            logger.warning("%s: unreadable cache entry (%s: %s); recomputing", path, type(err).__name__, err)
            return None
        if not valid:
            logger.info("%s: stale cache entry (other extractor, feature pipeline version or changed source file); "
                        "recomputing", path)
            return None
        return entry["tokens"] if branch == "rgb" else parts_from_tensors(entry)

    def _save(self, branch: str, record: SampleRecord, parts: torch.Tensor | XYZParts | PointParts | GridParts
              ) -> None:
        entry: dict[str, object] = {
            "format": CACHE_FORMAT,
            "fingerprint": self.extractor.fingerprint(branch),
            "pipeline_version": FEATURE_PIPELINE_VERSION,
            "source": str(_source_file(record, branch)),
            "source_stat": _stat(_source_file(record, branch)),
        }
        if branch == "rgb":
            entry["tokens"] = parts.detach().cpu().contiguous()
        else:  # compact integer types, converted back on load: the round trip is exact
            entry.update(parts_to_tensors(parts))
        save_torch_atomic(self.entry_path(branch, record), entry)

    # --- features ----------------------------------------------------------------------------------------------

    def _compute(self, branch: str, batch: Batch, indices: Sequence[int]) -> list:
        if branch == "rgb":
            return self.extractor.extract_rgb_parts(batch.rgb[list(indices)])
        if batch.xyz is None:
            raise DatasetError(f"{batch.records[0].rgb_path}: the 3D branch needs point clouds (xyz files)")
        parts = []
        for i in indices:
            try:
                parts += self.extractor.extract_xyz_parts(batch.xyz[i : i + 1])
            except ValueError as err:
                raise DatasetError(f"{batch.records[i].xyz_path}: {err}") from None
        return parts

    def parts(self, branch: str, batch: Batch) -> list:
        """The parts of ``branch`` for every sample of ``batch``, read from the cache or computed (and stored)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        found = [None] * len(batch) if self.cache_dir is None else [self.load(branch, r) for r in batch.records]
        missing = [i for i, part in enumerate(found) if part is None]
        self.hits += len(batch) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, part in zip(missing, self._compute(branch, batch, missing)):
                found[i] = part
                if self.cache_dir is not None:
                    self._save(branch, batch.records[i], part)
        return found

    def features(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """F2D (B, S², C2) and F3D (B, S², C3) of a batch (None for a branch the extractor does not have)."""
        f2d = f3d = None
        if self.extractor.rgb_backbone is not None:
            f2d = self.extractor.rgb_maps(self.parts("rgb", batch))
        if self.extractor.xyz_backbone is not None:
            f3d = self.extractor.xyz_maps(self.parts("xyz", batch))
        return f2d, f3d

    def precompute(self, dataset: MVTec3DDataset, batch_size: int = 1) -> None:
        """Fill the cache for every sample of ``dataset`` (with a progress bar); a no-op when already filled."""
        if self.cache_dir is None:
            return
        loader = make_dataloader(dataset, batch_size)
        desc = f"features {dataset.class_name}/{dataset.split}"
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            for branch in BRANCHES:
                if getattr(self.extractor, f"{branch}_backbone") is not None:
                    self.parts(branch, batch)
