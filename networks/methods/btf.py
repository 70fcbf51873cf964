"""BTF — "Back to the Feature" (Horwitz and Hoshen, CVPR 2023): PatchCore on RGB and FPFH patch features.

Per class, one memory bank holds the patch features of the training images (a 28 × 28 grid at 224 px): the RGB
features ([RGB]: ``--modality rgb``), the FPFH features ([FPFH]: ``xyz``) or their concatenation [RGB, FPFH]
(``rgbxyz``: BTF proper), reduced to a greedy k-center coreset (10 %). A test patch scores its distance to the
nearest bank entry; the map is that distance bilinearly upsampled to 224 and Gaussian-blurred (σ = 4); the image
score is PatchCore's re-weighted maximum. docs/methods.md lists where this differs from the reference code.

The patch features come from BTF's own extractors (:data:`BTF_PRESETS`): at ``paper`` size Wide-ResNet-50-2
layer 2 + 3 (1536 channels) and FPFH, each through AvgPool 3×3 and adaptive pooling to 28 × 28; with ``lite``
the EfficientNet-Lite0 stages of the lite preset, pooled the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from networks.blocks.fusion import resize_map
from networks.blocks.memory_bank import (
    MemoryBank, gaussian_blur, greedy_coreset, nearest_neighbours, pil_blur_8bit,
    reweighted_image_score,
)
from networks.extractors.fpfh import FPFHConfig
from networks.extractors.resnet import ResNetConfig
from networks.features import PRESETS, ExtractorConfig
from networks.methods.detector import MemoryBankDetector, Prediction, register_detector

PATCH_GRID = 28  # BTF's AdaptiveAvgPool2d((28, 28))
CORESET_FRACTION = 0.1
REWEIGHT_NEIGHBOURS = 3

# The references' patch features: stages pooled by AvgPool 3×3 + adaptive pooling to 28 × 28, FPFH scattered to
# 224², AvgPool 3×3 + adaptive pooling to 28 × 28 (the shared FPFH, radii in point spacings: docs/methods.md).
BTF_PRESETS = {
    "paper": ExtractorConfig(img_size=224, feature_size=PATCH_GRID, rgb=ResNetConfig("wide_resnet50_2", (2, 3)),
                             xyz=FPFHConfig(), stage_pooling="avg3"),
    "lite": dataclasses.replace(PRESETS["lite_fpfh"], feature_size=PATCH_GRID, stage_pooling="avg3"),
    "lite_fpfh": dataclasses.replace(PRESETS["lite_fpfh"], feature_size=PATCH_GRID, stage_pooling="avg3"),
}


@register_detector
class BTF(MemoryBankDetector):
    """``btf``: one PatchCore memory bank of [RGB], [FPFH] or [RGB, FPFH] patch features per class.

    Options (``--model_option``): ``coreset`` — the fraction of training patches kept (default 0.1; 1 keeps all);
    ``blur`` — ``exact`` (float Gaussian, default) or ``pil8bit`` (the reference's 8-bit PIL blur).
    """

    name = "btf"
    modalities = ("rgbxyz", "rgb", "xyz")
    option_choices = {"coreset": float, "blur": ("exact", "pil8bit")}
    presets = BTF_PRESETS

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz", coreset: float = CORESET_FRACTION,
                 blur: str = "exact") -> None:
        super().__init__(config, modality)
        if not 0 < coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {coreset}")
        self.coreset, self.blur = float(coreset), blur
        widths = {"2d": config.rgb_dim, "3d": config.xyz_dim}
        self.bank = MemoryBank(sum(widths[b] for b in self.branches))

    def options(self) -> dict:
        return {"coreset": self.coreset, "blur": self.blur}

    def patches(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None) -> torch.Tensor:
        """(B, G², D) patch features: F2D, F3D or [F2D, F3D] (no scaling between them, as the reference)."""
        return torch.cat([f for f, b in ((f2d, "2d"), (f3d, "3d")) if b in self.branches], dim=-1)

    def fit(self, batches: Iterable[tuple]) -> dict[str, float]:
        """Every training patch (background included, as the reference), then the coreset."""
        patches = torch.cat([self.patches(f2d, f3d).flatten(0, 1).cpu() for f2d, f3d, *_ in batches])
        keep = greedy_coreset(patches, self.coreset)
        self.bank.fill(patches[keep])
        return {"training_patches": len(patches), "bank_size": self.bank.rows,
                "bank_megabytes": self.bank.features.nelement() * 4 / 2**20}

    def _nearest(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank.rows == 0:
            raise RuntimeError("the BTF memory bank is empty: fit it (train.py) or load a checkpoint")
        distances, indices = nearest_neighbours(patches, self.bank.features)
        return distances[:, 0], indices[:, 0]

    def distance_maps(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Each patch's distance to its nearest bank entry, (B, G, G) (every patch: no masking, as the reference)."""
        grid = self.config.grid_size
        return {"patch": torch.stack([self._nearest(p)[0] for p in self.patches(f2d, f3d)]).reshape(-1, grid, grid)}

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """The upsampled patch distances, Gaussian-blurred (σ = 4)."""
        return gaussian_blur(maps["patch"]) if self.blur == "exact" else pil_blur_8bit(maps["patch"])

    def predict(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                variant: str = "full", xyz: torch.Tensor | None = None) -> Prediction:
        """The blurred map for P-AUROC and AUPRO, the re-weighted maximum patch distance for I-AUROC."""
        grid, size = self.config.grid_size, self.config.img_size
        distances, scores = [], []
        for patches in self.patches(f2d, f3d).float():
            distance, nearest = self._nearest(patches)
            distances.append(distance)
            scores.append(reweighted_image_score(patches, distance, nearest, self.bank.features,
                                                 REWEIGHT_NEIGHBOURS))
        patch_map = torch.stack(distances).reshape(-1, grid, grid)
        heat = self.fuse({"patch": resize_map(patch_map, size, "bilinear")}, mask, variant)
        return Prediction(torch.stack(scores), heat, heat)
