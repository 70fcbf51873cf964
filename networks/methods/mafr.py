"""MAFR (Ali, Zia et al.): a shared fusion encoder and attention-guided restoration, as docs/methods.md
describes the reference code.

Every pixel's concatenated features [F2D, F3D] go through a shared encoder and two decoupled decoders that
restore F2D and F3D; training sums, per modality, a z-normalised SSD, an edge-aware smoothness of the residual
and a 7×7 local-mean ("census") difference; the anomaly map is the product of the two L2 restoration residuals.
At paper size the widths are 1920 → 960 → 768 / 1152; other presets scale them from the feature widths
(encoder width (C2 + C3) // 2, decoder width = output width).

Reference quirks kept, each with its name in the README: the same LayerNorm instance reused inside the encoder
and inside each decoder; "CBAM" attention applied to 1×1 maps (a per-token channel gate and a per-token scalar
gate from the centre tap of the 7×7 kernel); the smoothness loss reading only channels 0 and 1 of the residual
(written for 2-channel optical flow) — ``smoothness="all"`` is the corrected variant; no background masking in
the losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks.blocks.dropout import Dropout
from networks.blocks.fusion import final_smoothing
from networks.features import ExtractorConfig
from networks.methods.detector import Detector, register_detector

DROPOUT = 0.1
ZNSSD_EPS = 1e-8
CENSUS_KERNEL = 7
SMOOTHNESS_CHOICES = ("reference", "all")
REFERENCE_SMOOTHNESS_CHANNELS = 2  # the reference's flow-style loss reads channels 0 and 1 only


class FusionEncoder(nn.Module):
    """Linear(in → h) → GELU → LN → Dropout → Linear(h → h) → GELU → the same LN → Dropout → Linear(h → h).

    (..., in_features) → (..., hidden), per token.
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)  # one instance, used twice (reference)
        self.act = nn.GELU()
        self.dropout = Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.norm(self.act(self.fc1(x))))
        x = self.dropout(self.norm(self.act(self.fc2(x))))
        return self.fc3(x)


class TokenCBAM(nn.Module):
    """CBAM on a token viewed as an (N, H, 1, 1) map, as the reference applies it.

    On a 1×1 map average and max pooling are the token itself, so the channel attention is sigmoid(2·fc(x)) per
    channel, and the 7×7 spatial convolution (zero padding 3) sees only its centre tap: a per-token scalar gate
    sigmoid(w_mean · mean_c(x) + w_max · max_c(x)). The parameters keep CBAM's shapes.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                        nn.Linear(hidden, channels, bias=False))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) → (..., H), per token."""
        fc = self.channel_fc(x)
        x = x * torch.sigmoid(fc + fc)  # fc(avgpool x) + fc(maxpool x), both pools = x
        centre = self.spatial.kernel_size[0] // 2
        stats = torch.stack([x.mean(dim=-1), x.amax(dim=-1)], dim=-1)  # (..., 2)
        return x * torch.sigmoid(stats @ self.spatial.weight[0, :, centre, centre])[..., None]


class DecoupledDecoder(nn.Module):
    """skip = Linear(in → out)(z); three Linear → LN (one shared instance) → GELU → Dropout layers of width
    H = out; TokenCBAM; output = Linear(H → out) + skip. (..., in_features) → (..., out_features)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        hidden = out_features
        self.skip = nn.Linear(in_features, out_features)
        self.layers = nn.ModuleList([nn.Linear(in_features, hidden), nn.Linear(hidden, hidden),
                                     nn.Linear(hidden, hidden)])
        self.norm = nn.LayerNorm(hidden)  # shared by the three layers (reference)
        self.act = nn.GELU()
        self.dropout = Dropout(DROPOUT)
        self.attention = TokenCBAM(hidden)
        self.output = nn.Linear(hidden, out_features)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for layer in self.layers:
            x = self.dropout(self.act(self.norm(layer(x))))
        return self.output(self.attention(x)) + self.skip(z)


def znssd_loss(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the per-pixel z-normalised vectors ((x − mean_c) / sqrt(var_c + 1e-8), the
    variance over channels without Bessel's correction). restored, target: (B, P, C)."""
    def znorm(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + ZNSSD_EPS)
    return (znorm(restored) - znorm(target)).pow(2).mean()


def smoothness_loss(restored: torch.Tensor, target: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Edge-aware first differences of the residual r = restored − target on the (G−1)² crop:
    mean(|∂x r|·exp(−|∂x ī|)) + mean(|∂y r|·exp(−|∂y ī|)), ī = channel mean of the target.

    Args:
        restored, target: (B, C, G, G).
        channels: only the first ``channels`` channels of r (the reference: 2); None: all.
    """
    residual = (restored - target)[:, :channels]
    image = target.mean(dim=1, keepdim=True)

    def dx(x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1, 1:] - x[..., :-1, :-1]

    def dy(x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:, :-1] - x[..., :-1, :-1]

    return ((dx(residual).abs() * torch.exp(-dx(image).abs())).mean()
            + (dy(residual).abs() * torch.exp(-dy(image).abs())).mean())


def census_loss(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |AvgPool7×7(target) − AvgPool7×7(restored)| (stride 1, zero padding 3). restored, target: (B, C, G, G)."""
    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, CENSUS_KERNEL, stride=1, padding=CENSUS_KERNEL // 2)
    return (pool(target) - pool(restored)).abs().mean()


@register_detector
class MAFR(Detector):
    """``mafr``: shared fusion encoder + two decoupled restoration decoders.

    Args:
        smoothness: ``reference`` (the smoothness loss on channels 0 and 1 only, as the reference) or ``all``.
    """

    name = "mafr"
    modalities = ("rgbxyz",)
    option_choices = {"smoothness": SMOOTHNESS_CHOICES}

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz", smoothness: str = "reference") -> None:
        super().__init__(config, modality)
        if smoothness not in SMOOTHNESS_CHOICES:
            raise ValueError(f"mafr smoothness must be one of {SMOOTHNESS_CHOICES}, got {smoothness!r}")
        self.smoothness = smoothness
        c2, c3 = config.rgb_dim, config.xyz_dim
        hidden = (c2 + c3) // 2
        self.encoder = FusionEncoder(c2 + c3, hidden)
        self.decoder2d = DecoupledDecoder(hidden, c2)
        self.decoder3d = DecoupledDecoder(hidden, c3)

    def options(self) -> dict[str, Any]:
        return {"smoothness": self.smoothness}

    def restore(self, f2d: torch.Tensor, f3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, C2), (B, P, C3) → the restored features, same shapes."""
        z = self.encoder(torch.cat([f2d, f3d], dim=-1))
        return self.decoder2d(z), self.decoder3d(z)

    def losses(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """ZNSSD, smoothness and census losses per modality (weight 1 each; no masking, as the reference)."""
        size = self.config.grid_size
        channels = REFERENCE_SMOOTHNESS_CHANNELS if self.smoothness == "reference" else None
        losses = {}
        for branch, restored, target in zip(("2d", "3d"), self.restore(f2d, f3d), (f2d, f3d)):
            grid_restored, grid_target = (x.transpose(1, 2).reshape(x.shape[0], -1, size, size)
                                          for x in (restored, target))
            losses[f"znssd{branch}"] = znssd_loss(restored, target)
            losses[f"smoothness{branch}"] = smoothness_loss(grid_restored, grid_target, channels)
            losses[f"census{branch}"] = census_loss(grid_restored, grid_target)
        return losses

    def distance_maps(self, f2d: torch.Tensor, f3d: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """r2 = ‖restored2D − F2D‖₂, r3 = ‖restored3D − F3D‖₂ per pixel, (B, G, G), zero where invalid."""
        size = self.config.grid_size
        restored2d, restored3d = self.restore(f2d, f3d)
        weight = mask.to(f2d.dtype)
        return {"r2": (torch.linalg.vector_norm(restored2d - f2d, dim=-1) * weight).reshape(-1, size, size),
                "r3": (torch.linalg.vector_norm(restored3d - f3d, dim=-1) * weight).reshape(-1, size, size)}

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """Ψ = smoothing(mask · r2 · r3)."""
        return final_smoothing(maps["r2"] * maps["r3"], valid)
