"""The frozen features of a training split, served to the epochs of a run without reading its files again.

The extractors are frozen, so an epoch needs each sample's cached parts and its valid mask, not its image, cloud
and mask files: decoding them took about as long as a step of the lite modules' forward pass. :class:`TrainingSet`
fills the feature cache once, keeps the parts in memory within a budget (:data:`HELD_PARTS_BUDGET`; beyond it they
are read from the cache's files each step), and assembles a batch's F2D, F3D and valid mask exactly as
:meth:`FeatureCache.features` and :func:`utils.runs.pipeline.valid_mask` do for a batch read from disk, so a run
trains to the same weights bit for bit either way. Without a cache (``--cache_dir none``) every batch is read and
its features computed, as the user asked.

:func:`index_loader` draws the epochs' orders: the same DataLoader and sampler as
:func:`utils.data.mvtec3d.make_dataloader`, over sample indices, so a seed gives the order it always gave.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.runs.feature_cache import BRANCHES, FeatureCache
from utils.runs.pipeline import feature_mask, valid_mask

logger = logging.getLogger(__name__)

# Parts held in memory for the epochs, at most (bytes): lite's 223-part class holds 0.2 GB, the paper preset's
# 1.6 GB, which is read from the cache's files every step instead.
HELD_PARTS_BUDGET = 1 << 30


def index_loader(size: int, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of sample indices (lists), shuffled by a generator seeded with ``seed``: the orders that
    :func:`utils.data.mvtec3d.make_dataloader` gives the dataset's samples."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(range(size), batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=list)


def _bytes(parts: object) -> int:
    """Memory of a sample's parts (tensors, or dataclasses of tensors)."""
    if isinstance(parts, torch.Tensor):
        return parts.numel() * parts.element_size()
    return sum(_bytes(v) for v in vars(parts).values() if v is not None)


class TrainingSet:
    """Every sample's features of ``dataset`` for the epochs of a training run.

    Args:
        cache: the feature cache (its extractor decides the branches); ``cache_dir=None``: computed every batch.
        dataset: the training split.
        batch_size: the batch size of the cache's one precomputing pass.
        budget: bytes of parts held in memory at most (None: :data:`HELD_PARTS_BUDGET`).
    """

    def __init__(self, cache: FeatureCache, dataset: MVTec3DDataset, batch_size: int = 1,
                 budget: int | None = None) -> None:
        self.cache = cache
        self.dataset = dataset
        self.branches = [b for b in BRANCHES if getattr(cache.extractor, f"{b}_backbone") is not None]
        self.held: dict[str, list] = {}
        self.pixels: list[torch.Tensor] | None = None  # (G²,) valid cells of each sample, for the 2D-only model
        if cache.cache_dir is None:
            return
        cache.precompute(dataset, batch_size)
        first = {branch: self._read(branch, [0])[0] for branch in self.branches}
        held = len(dataset) * sum(_bytes(parts) for parts in first.values())
        budget = HELD_PARTS_BUDGET if budget is None else budget
        if held <= budget:
            for branch in self.branches:
                self.held[branch] = self._read(branch, range(len(dataset)), f"{dataset.class_name} features")
        else:
            logger.info("%s: the training features (%.1f GB) exceed the memory budget of %.1f GB: read from the "
                        "cache every step", dataset.class_name, held / 1e9, budget / 1e9)
        if "xyz" not in self.branches:  # the 2D-only model's valid cells come from the files: read them once
            self.pixels = [valid_mask(collate_samples([dataset[i]]), None, cache.extractor)[0].cpu()
                           for i in tqdm(range(len(dataset)), desc=f"{dataset.class_name} masks", unit="sample",
                                         leave=False)]

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, branch: str, indices, desc: str | None = None) -> list:
        """The cached parts of the samples ``indices``; a missing entry (removed since) is computed again."""
        parts = []
        for i in tqdm(indices, desc=desc, unit="sample", leave=False) if desc else indices:
            found = self.cache.load(branch, self.dataset.records[i])
            parts.append(found if found is not None else
                         self.cache.parts(branch, collate_samples([self.dataset[i]]))[0])
        return parts

    def features(self, indices: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """F2D (B, G², C2) or None, F3D (B, G², C3) or None and the (B, G²) valid mask of the samples ``indices``."""
        extractor = self.cache.extractor
        if self.cache.cache_dir is None:
            batch = collate_samples([self.dataset[i] for i in indices])
            f2d, f3d = self.cache.features(batch)
            return f2d, f3d, valid_mask(batch, f3d, extractor)
        parts = {branch: [self.held[branch][i] for i in indices] if branch in self.held else
                 self._read(branch, indices) for branch in self.branches}
        f2d = extractor.rgb_maps(parts["rgb"]) if "rgb" in parts else None
        f3d = extractor.xyz_maps(parts["xyz"]) if "xyz" in parts else None
        if f3d is not None:
            return f2d, f3d, feature_mask(f3d)
        return f2d, f3d, torch.stack([self.pixels[i] for i in indices]).to(extractor.device)

    def batches(self, batch_size: int = 1):
        """(F2D, F3D, mask) of every sample once, in order, ``batch_size`` at a time."""
        for indices in index_loader(len(self), batch_size):
            yield self.features(indices)
