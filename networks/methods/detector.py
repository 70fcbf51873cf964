"""The interface every anomaly detection method of the harness implements, and the registry of methods.

A method is a pure ``nn.Module`` on frozen features: it says which feature branches a modality needs, builds its
trainable parts for an :class:`~networks.features.ExtractorConfig`, returns named losses and its optimisers'
parameter groups, and predicts the smoothed anomaly map Ψ from features. Data, optimisers, the training loop,
checkpoints and metrics are shared (``train.py``, ``inference.py``, :mod:`utils.runs.checkpoints`), as in anomalib's
split of models from their training glue. Adding a method (docs/methods.md)::

    @register_detector
    class MyMethod(Detector):
        name = "mine"                        # --model mine
        modalities = ("rgbxyz",)             # the --modality values it supports
        def __init__(self, config, modality="rgbxyz", **options):
            super().__init__(config, modality)
            self.net = nn.Linear(config.rgb_dim, config.xyz_dim)
        def losses(self, f2d, f3d, mask): return {"net": masked_cosine_loss(self.net(f2d), f3d, mask)}
        def distance_maps(self, f2d, f3d, mask):
            g = self.config.grid_size
            return {"d": feature_distance(self.net(f2d), f3d, mask).reshape(-1, g, g)}
        def fuse(self, maps, valid, variant): return final_smoothing(maps["d"], valid)

and one import line in :mod:`networks.methods.registry`. Memory-bank methods (BTF, ...) derive from
:class:`MemoryBankDetector` (below) instead: they are fitted in one pass, not trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from networks.blocks.fusion import normalize_scores, resize_map
from networks.features import ExtractorConfig

BRANCHES_OF_MODALITY = {"rgbxyz": ("2d", "3d"), "rgb": ("2d",), "xyz": ("3d",)}
MODALITIES = tuple(BRANCHES_OF_MODALITY)
LOSS_EPS = 1e-6


@dataclass(frozen=True)
class OptimizerGroup:
    """One Adam optimiser: the modules it updates and the losses that drive them (summed).

    A step of the group is skipped when one of its losses is not finite.
    """

    modules: tuple[str, ...]
    losses: tuple[str, ...] | None = None  # None: every loss of the method
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def settings(self) -> dict[str, Any]:
        return {"name": "Adam", "lr": self.lr, "betas": list(self.betas), "weight_decay": self.weight_decay}


@dataclass
class Prediction:
    """What a method predicts for a batch (anomalib's idea of a prediction dataclass).

    Attributes:
        image_scores: (B,) image anomaly scores (I-AUROC).
        maps: (B, S, S) anomaly maps for AUPRO and the heatmaps.
        pixel_scores: (B, S, S) per-pixel scores for P-AUROC.
    """

    image_scores: torch.Tensor
    maps: torch.Tensor
    pixel_scores: torch.Tensor


class Detector(nn.Module):
    """Base class of the methods (a pure ``nn.Module``; subclasses register with :func:`register_detector`).

    Args:
        config: the frozen extractors' configuration (feature widths C2, C3, grid G, image size S).
        modality: one of the class's ``modalities``.

    Subclasses set ``name`` and ``modalities`` and implement :meth:`losses`, :meth:`distance_maps` and
    :meth:`fuse`; they override :meth:`optimizer_groups` when they do not train all modules with one Adam.
    Trainable modules are attributes whose names are the checkpoint files' module names (:meth:`trainable`).
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("rgbxyz",)
    fusion_variants: ClassVar[tuple[str, ...]] = ("full",)
    #: fusion variants that are a single-modality row of the method's paper (Shape-Guided's ``sdf_only``: its 3D
    #: row), with that modality: the tables put them there
    variant_modalities: ClassVar[Mapping[str, str]] = {}
    #: options of the constructor that ``--model_option NAME=VALUE`` may set: their allowed values, or a type
    #: (``float``, ``int``) the value is converted to
    option_choices: ClassVar[Mapping[str, tuple[str, ...] | type]] = {}
    #: the method's own feature extractors for some ``--preset`` names (BTF: Wide-ResNet-50-2 + FPFH for
    #: ``paper``); the other presets are :data:`networks.features.PRESETS`
    presets: ClassVar[Mapping[str, ExtractorConfig]] = {}
    #: whether :meth:`predict` (and a memory-bank method's ``fit``) reads the organized point clouds themselves
    needs_clouds: ClassVar[bool] = False

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz") -> None:
        super().__init__()
        if modality not in self.modalities:
            raise ValueError(f"{self.name} supports --modality {' / '.join(self.modalities)}, got {modality!r}")
        self.config = config
        self.modality = modality

    # --- what the harness asks of a method ---------------------------------------------------------------------

    @property
    def branches(self) -> tuple[str, ...]:
        """The feature branches the method reads: ``("2d", "3d")``, ``("2d",)`` or ``("3d",)``."""
        return BRANCHES_OF_MODALITY[self.modality]

    def options(self) -> dict[str, Any]:
        """Method options that change the trained weights or the maps (part of the run identity)."""
        return {}

    def trainable(self) -> dict[str, nn.Module]:
        """The trainable modules by checkpoint name (one ``.pth`` file each), in construction order."""
        return dict(self.named_children())

    def optimizer_groups(self) -> dict[str, OptimizerGroup]:
        """Optimiser name → group; default: one Adam (lr 1e-3) over every module, driven by the sum of all losses."""
        return {self.name: OptimizerGroup(tuple(self.trainable()))}

    def losses(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Named scalar losses of a batch. f2d: (B, G², C2) or None; f3d: (B, G², C3) or None; mask: (B, G²)."""
        raise NotImplementedError

    def distance_maps(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Named per-pixel distance maps on the feature grid, each (B, G, G), zero on invalid pixels."""
        raise NotImplementedError

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str) -> torch.Tensor:
        """The smoothed anomaly map Ψ (B, S, S) from the distance maps at the image size and the valid mask."""
        raise NotImplementedError

    def finish_training(self, batches: Iterable[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]]
                        ) -> dict[str, Any]:
        """After the last epoch, in evaluation mode: whatever the method fits on the trained modules' outputs over the
        training set (``batches`` yields (F2D, F3D, mask) of every training sample once); returns what is worth
        recording in the sidecar. Default: nothing."""
        return {}

    # --- shared ------------------------------------------------------------------------------------------------

    def predict(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                variant: str = "full", xyz: torch.Tensor | None = None) -> Prediction:
        """Image scores and maps of a batch: Ψ (:meth:`anomaly_map`) and the reference's three normalisations
        (:func:`networks.blocks.fusion.normalize_scores`). Memory-bank methods score images their own way; ``xyz``
        (B, 3, S, S), the organized clouds, is read by the methods that set ``needs_clouds``."""
        maps, image_scores, pixel_scores = normalize_scores(self.anomaly_map(f2d, f3d, mask, variant).float())
        return Prediction(image_scores, maps, pixel_scores)

    def anomaly_map(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                    variant: str = "full") -> torch.Tensor:
        """The final smoothed anomaly map Ψ (B, S, S).

        On a feature grid smaller than the input (G < S) the distance maps are upsampled bilinearly and the valid
        mask by nearest neighbour to S before the fusion, whose smoothing kernels are sized for S.
        """
        if variant not in self.fusion_variants:
            raise ValueError(f"{self.name} has the fusion variants {self.fusion_variants}, got {variant!r}")
        return self.fuse(*self.image_size_maps(f2d, f3d, mask), variant)

    def image_size_maps(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """What :meth:`fuse` takes: the distance maps at the image size S, each (B, S, S), and the valid mask
        (B, S, S) bool — bilinear and nearest-neighbour upsampling from the feature grid when G < S."""
        grid, size = self.config.grid_size, self.config.img_size
        maps = self.distance_maps(f2d, f3d, mask)
        valid = mask.reshape(-1, grid, grid)
        if grid != size:
            maps = {name: resize_map(distance, size, "bilinear") for name, distance in maps.items()}
            valid = resize_map(valid.float(), size, "nearest") > 0
        return maps, valid


# --- shared loss and distance of the feature-mapping methods (CMDR-IAD, CFM) -----------------------------------

def cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean over rows of cos(prediction, target); F.normalize eps 1e-6. (N, C), (N, C) → scalar."""
    cosine = (F.normalize(prediction, dim=-1, eps=LOSS_EPS) * F.normalize(target, dim=-1, eps=LOSS_EPS)).sum(-1)
    return 1.0 - cosine.mean()


def masked_cosine_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − mean over valid pixels (of the whole batch) of cos(prediction, target); F.normalize eps 1e-6.

    Args:
        prediction, target: (B, P, C).
        mask: (B, P) bool.
    """
    return cosine_loss(prediction[mask], target[mask])


def feature_distance(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖a/‖a‖ − b/‖b‖‖₂ per pixel (F.normalize default eps), zero on invalid pixels: (B, P, C) → (B, P)."""
    distance = torch.linalg.vector_norm(F.normalize(prediction, dim=-1) - F.normalize(target, dim=-1), dim=-1)
    return distance * mask.to(distance.dtype)


def row_distance(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`feature_distance` of the valid rows only: prediction and target (N, C) are the rows of ``mask``
    (B, P) in order; returns (B, P), zero on invalid pixels."""
    distance = torch.linalg.vector_norm(F.normalize(prediction, dim=-1) - F.normalize(target, dim=-1), dim=-1)
    return torch.zeros(mask.shape, dtype=distance.dtype, device=distance.device).masked_scatter_(mask, distance)


class PixelwiseMixin:
    """A method with per-pixel modules (a pixel's output depends on that pixel's features alone: the mapping MLPs)
    runs them on the valid pixels only — in training the loss reads nothing else, in inference the map is zero
    elsewhere — which on real parts (15–30 % of the grid valid) is a fraction of the work. The exported graph
    (:mod:`networks.graph`) sets ``valid_rows_only = False`` and computes every pixel, as a fixed-shape graph must;
    the valid pixels' values are the same."""

    valid_rows_only: bool = True

    def pixelwise(self, module: nn.Module, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target): the valid rows (N, C) of both, or (when ``valid_rows_only`` is off) every pixel
        (B, P, C) of both."""
        if self.valid_rows_only:
            return module(source[mask]), target[mask]
        return module(source), target

    def pixelwise_loss(self, module: nn.Module, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
        """:func:`masked_cosine_loss` of ``module(source)`` against ``target``."""
        prediction, target = self.pixelwise(module, source, target, mask)
        return cosine_loss(prediction, target) if self.valid_rows_only else masked_cosine_loss(prediction, target, mask)

    def pixelwise_distance(self, module: nn.Module, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                           ) -> torch.Tensor:
        """:func:`feature_distance` of ``module(source)`` and ``target``, (B, P)."""
        prediction, target = self.pixelwise(module, source, target, mask)
        return row_distance(prediction, target, mask) if self.valid_rows_only \
            else feature_distance(prediction, target, mask)


# --- memory-bank methods ------------------------------------------------------------------------------------

class MemoryBankDetector(Detector):
    """Base of the memory-bank methods: :meth:`fit` once on the training features; no losses, no optimisers.

    The trainable modules (:meth:`trainable`) are :class:`MemoryBank` buffers (and, for Shape-Guided, a trained
    3D expert); they are written to checkpoints like the gradient-trained methods' weights.
    """

    def fit(self, batches: Iterable[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]]
            ) -> dict[str, float]:
        """Build the banks from the training set: ``batches`` yields (F2D, F3D, mask) as :meth:`losses` takes
        them, and the organized clouds (B, 3, S, S) or None.

        Returns:
            numbers worth recording in the run's sidecar (bank sizes, ...).
        """
        raise NotImplementedError

    def optimizer_groups(self) -> dict[str, OptimizerGroup]:
        return {}

    def losses(self, f2d, f3d, mask):  # noqa: ANN001, D102 - fitted, not trained
        raise TypeError(f"{self.name} is a memory-bank method: it is fitted (fit), not trained with losses")


# --- registry --------------------------------------------------------------------------------------------------

DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make ``cls`` reachable as ``--model <cls.name>``."""
    if not cls.name or cls.name in DETECTORS:
        raise ValueError(f"a detector needs a unique name; {cls.name!r} is empty or taken")
    DETECTORS[cls.name] = cls
    return cls
