"""CFM — Crossmodal Feature Mapping (Costanzino et al., CVPR 2024), as docs/methods.md describes it.

Two per-pixel MLPs map 2D features to 3D ones and back; one Adam over both, the sum of the two masked cosine
losses. The anomaly map is the product of the two cosine-distance maps, masked, then the shared final smoothing
(5 × box 5, 3 × box 7) and normalisations.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.blocks.fusion import final_smoothing
from networks.features import ExtractorConfig
from networks.methods.detector import Detector, PixelwiseMixin, register_detector


class CFMMLP(nn.Module):
    """Linear(in → h) → GELU → Linear(h → h) → GELU → Linear(h → out), h = (in + out) // 2 (no norm, no dropout).

    (B, P, in_features) → (B, P, out_features).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_detector
class CFM(PixelwiseMixin, Detector):
    """``cfm``: the 2D→3D and 3D→2D mapping MLPs (768 ↔ 1152, hidden 960 at paper size)."""

    name = "cfm"
    modalities = ("rgbxyz",)

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz") -> None:
        super().__init__(config, modality)
        self.map2Dto3D = CFMMLP(config.rgb_dim, config.xyz_dim)
        self.map3Dto2D = CFMMLP(config.xyz_dim, config.rgb_dim)

    def losses(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """1 − mean cosine over valid pixels, per direction (summed by the one optimiser)."""
        return {"map2Dto3D": self.pixelwise_loss(self.map2Dto3D, f2d, f3d, mask),
                "map3Dto2D": self.pixelwise_loss(self.map3Dto2D, f3d, f2d, mask)}

    def distance_maps(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """d3 = ‖n(M2D→3D(F2D)) − n(F3D)‖ and d2 = ‖n(M3D→2D(F3D)) − n(F2D)‖, (B, G, G), zero where invalid."""
        size = self.config.grid_size
        return {"d3": self.pixelwise_distance(self.map2Dto3D, f2d, f3d, mask).reshape(-1, size, size),
                "d2": self.pixelwise_distance(self.map3Dto2D, f3d, f2d, mask).reshape(-1, size, size)}

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """Ψ = smoothing(mask · d2 · d3)."""
        return final_smoothing(maps["d2"] * maps["d3"], valid)
