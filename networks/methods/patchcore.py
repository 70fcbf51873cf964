"""A plain PatchCore memory bank (Roth et al., CVPR 2022) on any preset's features: 2D, 3D or both.

BTF is PatchCore on its own extractors (Wide-ResNet-50-2 + FPFH at 28²); ``patchcore`` runs the same bank — every
training patch, a greedy k-center coreset of 10 %, nearest-neighbour distances, the re-weighted maximum as the
image score, the σ = 4 blurred map — on the shared features of ``--preset`` (:data:`networks.features.PRESETS`):
with ``lite`` the EfficientNet-Lite stages and the geometry images on the 56² grid.
"""

from __future__ import annotations

from networks.methods.btf import BTF
from networks.methods.detector import register_detector


@register_detector
class PatchCore(BTF):
    """``patchcore``: :class:`networks.methods.btf.BTF`'s bank on the preset's features (F2D, F3D or [F2D, F3D])."""

    name = "patchcore"
    presets = {}
