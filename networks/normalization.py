"""What an RGB backbone's inputs are normalised with, at the lowest level that needs it (the backbones'
configurations here; the data loading in :mod:`utils.data.transforms` applies it)."""

from __future__ import annotations

from typing import NamedTuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalization(NamedTuple):
    """Per-channel mean and std of an RGB backbone's inputs (images scaled to [0, 1]); each backbone's
    configuration says which it needs (``ExtractorConfig.normalization``)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)
