"""The trainable part of CMDR-IAD: two cross-modal mapping MLPs and two reconstruction decoders.

:class:`CMDRIAD` is the harness's ``cmdr`` detector (:mod:`networks.methods.detector`): given frozen features it returns
per-module losses (training) and distance maps and the fused anomaly map (inference). Each module has its own
Adam optimiser. Data, the training loop and checkpoints live in ``train.py``, ``inference.py`` and
:mod:`utils.runs.checkpoints`.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.blocks.cell_statistics import CellStatistics
from networks.blocks.decoders import Decoder2D, Decoder3D
from networks.blocks.fusion import FUSION_VARIANTS, fuse, single_modality_map
from networks.blocks.mapping import FeatureMappingMLP
from networks.features import ExtractorConfig
from networks.methods.detector import (
    MODALITIES, Detector, OptimizerGroup, PixelwiseMixin, feature_distance, masked_cosine_loss, register_detector,
)

MODULE_NAMES = ("map2Dto3D", "map3Dto2D", "Dec2D", "Dec3D")
MODULES_OF_MODALITY = {"rgbxyz": MODULE_NAMES, "rgb": ("Dec2D",), "xyz": ("Dec3D",)}
CELL_NORM_CHOICES = ("off", "auto", "on")
# Which features each module reads and which it predicts.
_INPUT_AND_TARGET = {"map2Dto3D": ("2d", "3d"), "map3Dto2D": ("3d", "2d"), "Dec2D": ("2d", "2d"), "Dec3D": ("3d", "3d")}
# The modules whose output at a pixel depends on that pixel's features alone (run on the valid pixels only).
PIXELWISE_MODULES = ("map2Dto3D", "map3Dto2D")
# The distance map each module yields, by the method's names.
DISTANCE_NAMES = {"map3Dto2D": "d_map2d", "map2Dto3D": "d_map3d", "Dec2D": "d_rec2d", "Dec3D": "d_rec3d"}


def build_module(name: str, config: ExtractorConfig) -> nn.Module:
    """One trainable module sized for ``config`` (the paper preset gives exactly the reference modules)."""
    c2, c3, size = config.rgb_dim, config.xyz_dim, config.grid_size
    if name == "map2Dto3D":
        return FeatureMappingMLP(c2, c3)
    if name == "map3Dto2D":
        return FeatureMappingMLP(c3, c2)
    if name == "Dec2D":  # paper: 8 heads of 48 channels; smaller widths keep the head width, with at least 1 head
        reduced = c2 // 2
        return Decoder2D(c2, size, num_heads=max(1, reduced // 48), window_size=128,
                         conv_channels=(reduced * 2 // 3, reduced // 3))
    if name == "Dec3D":
        # the paper's widths scaled by C3 / 1152, at least 1 (FPFH's 33 channels would give a zero-width layer)
        return Decoder3D(size * size, c3, channels=tuple(max(1, c3 * c // 1152) for c in (768, 512, 256, 128)))
    raise ValueError(f"unknown module {name!r}; choose from {MODULE_NAMES}")


@register_detector
class CMDRIAD(PixelwiseMixin, Detector):
    """The four trainable modules of CMDR-IAD (only those the modality needs are built).

    Args:
        config: the frozen extractors' configuration (feature widths and image size).
        modality: ``rgbxyz`` (all four), ``rgb`` (Dec2D) or ``xyz`` (Dec3D).
        cell_norm: the maps normalised per pixel by the good training parts' (:mod:`networks.blocks.cell_statistics`):
            ``auto`` (where those parts share one layout), ``on``, ``off``; default ``auto`` for the 2D-only model
            (measured on MVTec 3D-AD rope, docs/real_data.md), ``off`` otherwise (the paper's model).
    """

    name = "cmdr"
    modalities = MODALITIES
    fusion_variants = FUSION_VARIANTS
    option_choices = {"cell_norm": CELL_NORM_CHOICES}

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz", cell_norm: str | None = None) -> None:
        super().__init__(config, modality)
        self.module_names = MODULES_OF_MODALITY[modality]
        for name in self.module_names:  # built in a fixed order: initialisation is reproducible for a seed
            self.add_module(name, build_module(name, config))
        self.cell_norm = cell_norm or ("auto" if modality == "rgb" else "off")
        if self.cell_norm not in CELL_NORM_CHOICES:
            raise ValueError(f"cell_norm must be one of {CELL_NORM_CHOICES}, got {self.cell_norm!r}")
        if self.cell_norm != "off":  # buffers only, after the modules: their initialisation does not move
            self.cell_statistics = CellStatistics(config.img_size, self.cell_norm)

    def options(self) -> dict[str, str]:
        """``cell_norm`` where it is not ``off`` (the runs before the option keep their identity)."""
        return {} if self.cell_norm == "off" else {"cell_norm": self.cell_norm}

    def anomaly_map(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                    variant: str = "full") -> torch.Tensor:
        """Ψ (B, S, S), normalised per pixel where ``cell_norm`` applies."""
        psi = super().anomaly_map(f2d, f3d, mask, variant)
        return psi if self.cell_norm == "off" else self.cell_statistics(psi)

    @torch.no_grad()
    def finish_training(self, batches) -> dict:
        """With ``cell_norm``: the per-pixel statistics of the training parts' maps Ψ (and whether they apply)."""
        if self.cell_norm == "off":
            return {}
        maps = [Detector.anomaly_map(self, f2d, f3d, mask).float().cpu() for f2d, f3d, mask in batches]
        return self.cell_statistics.fit(torch.cat(maps))

    def optimizer_groups(self) -> dict[str, OptimizerGroup]:
        """One Adam per module, each driven by its own loss (the paper's training)."""
        return {name: OptimizerGroup((name,), (name,)) for name in self.module_names}

    def _pairs(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None):
        """(name, module, source features, target features) of every module."""
        features = {"2d": f2d, "3d": f3d}
        for name in self.module_names:
            module = getattr(self, name)
            source, target = _INPUT_AND_TARGET[name]
            yield name, module, features[source], features[target]

    def losses(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked cosine loss of every module.

        Args:
            f2d: (B, P, C2) or None; f3d: (B, P, C3) or None.
            mask: (B, P) valid pixels.
        """
        return {name: self.pixelwise_loss(module, source, target, mask) if name in PIXELWISE_MODULES
                else masked_cosine_loss(module(source), target, mask)
                for name, module, source, target in self._pairs(f2d, f3d)}

    def distance_maps(
        self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The distance maps (``d_map2d``, ``d_map3d``, ``d_rec2d``, ``d_rec3d``), each (B, G, G)."""
        size = self.config.grid_size
        return {
            DISTANCE_NAMES[name]: (self.pixelwise_distance(module, source, target, mask) if name in PIXELWISE_MODULES
                                   else feature_distance(module(source), target, mask)).reshape(-1, size, size)
            for name, module, source, target in self._pairs(f2d, f3d)
        }

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """Ψ of the modality: Eq. 7 (or ``variant``) for ``rgbxyz``, the single reconstruction map otherwise."""
        if self.modality == "rgbxyz":
            return fuse(maps["d_map2d"], maps["d_map3d"], maps["d_rec2d"], maps["d_rec3d"], valid, variant)
        if variant != "full":
            raise ValueError("--fusion applies to --modality rgbxyz only")
        distance = maps["d_rec2d"] if self.modality == "rgb" else maps["d_rec3d"]
        return single_modality_map(distance, valid, self.modality)
