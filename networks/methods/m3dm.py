"""M3DM — "Multimodal Industrial Anomaly Detection via Hybrid Fusion" (Wang et al., CVPR 2023).

What the reference computes (../shared/spec/peers.md, "M3DM") and how it maps onto the harness:

1. *Features* (:data:`M3DM_PRESETS`): the point features pooled to a 56 × 56 grid (Point-MAE through the PFA —
   3-NN propagation, AvgPool 3 × 3, AdaptiveAvgPool 56 — with ``paper``; lite's 3D branch with ``lite``) and the
   RGB tokens on their native 28 × 28 grid, replicated 2 × 2 onto the 56 grid where the two meet (the reference's
   AdaptiveAvgPool2d(56) of 28 tokens; ``rgb_upsampling="nearest"``, so the tokens stay exactly recoverable).
2. *Unsupervised Feature Fusion* (:class:`FeatureFusionBlock`, ``--model_option uff=FILE``): one MLP per
   modality, trained once for a whole dataset by patch-wise contrastive learning (``scripts/train_uff.py``); its
   concatenated outputs are the fused patches.
3. *Memory banks* (:class:`NormalizedBank`): every training patch of each modality — points (56²), RGB (28²) and,
   with a UFF, fused (56²) — standardised by scalars, reduced to a greedy k-center coreset.
4. *Scores per bank*: a patch's distance to its nearest bank row; the image score is PatchCore's re-weighted
   maximum; the map is the patch distances bilinearly upsampled to 224 and blurred (σ = 4).
5. *Decision Layer Fusion* (:class:`DecisionLayerFusion`): two linear one-class SVMs (SGD) fitted on the banks'
   scores of the training samples, one over the image scores, one over the pixels of the maps; the final image
   score and map are their ``score_samples``.

Modes: ``--modality rgb`` (the reference's ``DINO``: the RGB bank alone, standardised by its own mean and std),
``xyz`` (``Point_MAE``: the point bank alone, not standardised), ``rgbxyz`` (``DINO+Point_MAE``: two banks and
the DLF; with ``uff=FILE`` the full method, ``DINO+Point_MAE+Fusion``: three banks). ``decision=add`` sums the
banks' scores and maps instead of the DLF (the reference's ``+add`` mode).

The reference's quirks that its published numbers stand on are the defaults, the corrected behaviour an option
(docs/m3dm.md): the point bank's mean and the RGB bank's standard deviation standardise every bank
(``normalization=reference``; ``per_bank``), the RGB and fused coresets sized from the reduced point bank
(``coreset_sizes=reference``; ``per_bank``), the two-bank mode's division of the distances by 1000 before the
re-weighting, the SVMs fitted on in-sample training scores, the UFF trained on spatially scrambled pairs
(``scripts/train_uff.py --pairs scrambled``; ``aligned``). Not reproduced, because they only break things: the
8-bit maps before the blur (``blur=pil8bit`` brings them back), backbones left in training mode (ours are frozen
in eval mode), the UFF checkpoint loaded with ``strict=False`` (ours is strict), the distributed-only and
CUDA-only training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from networks.blocks.fusion import resize_map
from networks.blocks.memory_bank import (
    MemoryBank, gaussian_blur, greedy_coreset_of_size, nearest_neighbours, pil_blur_8bit,
    reweighted_image_score,
)
from networks.extractors.point_mae import Mlp, load_state_dict_checked, read_state_dict
from networks.features import PRESETS, ExtractorConfig, ViTConfig
from networks.methods.detector import MemoryBankDetector, Prediction, register_detector

logger = logging.getLogger(__name__)

M3DM_GRID = 56  # the PFA's AdaptiveAvgPool2d((56, 56))
RGB_GRID_FACTOR = 2  # RGB tokens on a 28² grid, replicated 2 × 2 onto the 56² grid
CORESET_FRACTION = 0.1
REWEIGHT_NEIGHBOURS = 3
TWO_BANK_DIVISOR = 1000.0  # DINO+Point_MAE divides s* and the neighbour distances by 1000 before re-weighting
# DLF inputs: the banks' scores and maps weighted by --{xyz,rgb,fusion}_{s,smap}_lambda (reference defaults)
DLF_WEIGHTS = {"xyz": 1.0, "rgb": 0.1, "fusion": 1.0}
# The RGB score weight on the CNN presets (lite): EfficientNet-Lite's RGB distances sit on the scale of the 3D
# branch's, where DINO's are ~10 × Point-MAE's; 0.1 leaves the RGB bank out of the image score there (measured on
# the synthetic classes: mean I-AUROC 80.8 with 0.1, 87.7 with 1; docs/m3dm.md). The map weight stays 0.1 (1 costs
# 10-19 points of P-AUROC).
CNN_RGB_S_LAMBDA = 1.0
SVM_NU, SVM_MAX_ITER, SVM_SEED = 0.5, 1000, 42  # SGDOneClassSVM(nu=0.5, max_iter=1000, random_state=42)
UFF_MLP_RATIO, UFF_HEAD_DIM, UFF_TEMPERATURE = 4.0, 256, 1.0
DLF_PIXEL_CHUNK = 1 << 22  # pixel rows per score_samples product

M3DM_PRESETS = {
    "paper": dataclasses.replace(PRESETS["paper"], feature_size=M3DM_GRID, rgb_upsampling="nearest"),
    "lite": dataclasses.replace(PRESETS["lite"], rgb_upsampling="nearest"),
    "lite_fpfh": dataclasses.replace(PRESETS["lite_fpfh"], rgb_upsampling="nearest"),
    "lite_curvature": dataclasses.replace(PRESETS["lite_curvature"], rgb_upsampling="nearest"),
    # tiny: 8² ViT tokens on a 16² grid, the same 2 × 2 relation at test size
    "tiny": dataclasses.replace(PRESETS["tiny"], feature_size=16, rgb_upsampling="nearest"),
}


# --- Unsupervised Feature Fusion ---------------------------------------------------------------------------------

class FeatureFusionBlock(nn.Module):
    """The UFF (the reference's ``FeatureFusionBlock``, same key names, so that its checkpoints load strictly).

    Per modality LayerNorm → MLP (ratio 4; Point-MAE's ``Mlp``: Linear → GELU → Linear, keys ``fc1``, ``fc2``, as
    timm's with dropout 0), no residual; the fused patch is [point_out, rgb_out]. The heads
    (→ 256) serve only the contrastive loss.
    """

    def __init__(self, xyz_dim: int, rgb_dim: int, mlp_ratio: float = UFF_MLP_RATIO, head_dim: int = UFF_HEAD_DIM
                 ) -> None:
        super().__init__()
        self.xyz_dim, self.rgb_dim = xyz_dim, rgb_dim
        self.xyz_norm = nn.LayerNorm(xyz_dim)
        self.xyz_mlp = Mlp(xyz_dim, int(xyz_dim * mlp_ratio))
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = Mlp(rgb_dim, int(rgb_dim * mlp_ratio))
        self.rgb_head = nn.Linear(rgb_dim, head_dim)
        self.xyz_head = nn.Linear(xyz_dim, head_dim)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """(..., C3) point and (..., C2) RGB patches → (..., C3 + C2) fused patches."""
        return torch.cat([self.xyz_mlp(self.xyz_norm(xyz)), self.rgb_mlp(self.rgb_norm(rgb))], dim=-1)

    def contrastive_loss(self, xyz: torch.Tensor, rgb: torch.Tensor, temperature: float = UFF_TEMPERATURE
                         ) -> torch.Tensor:
        """The reference's patch-wise InfoNCE over a batch: (B, P, C3) and (B, P, C2) paired patches.

        Only patches whose raw point feature has no zero entry take part (the foreground). q = the normalised RGB
        head of a patch, k = the normalised point head; L = 2T · CE(q·kᵀ / T, the same patch): the other kept
        patches of the whole batch are the negatives, RGB queries against point keys only.
        """
        xyz, rgb = xyz.flatten(0, -2), rgb.flatten(0, -2)
        keep = (xyz != 0).all(dim=1)
        fused = self(xyz[keep], rgb[keep])
        q = F.normalize(self.rgb_head(fused[:, self.xyz_dim :]), dim=1)
        k = F.normalize(self.xyz_head(fused[:, : self.xyz_dim]), dim=1)
        logits = q @ k.T / temperature
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device)) * (2 * temperature)


def load_uff_checkpoint(block: FeatureFusionBlock, path: Path) -> None:
    """A trained UFF (the authors' ``checkpoint-0.pth``, ``{"model": state_dict, ...}``, or ours), strictly."""
    state = read_state_dict(path, ("model",), " (train one with scripts/train_uff.py; the M3DM authors ship "
                                             "checkpoints/checkpoint-0.pth)")
    load_state_dict_checked(block, {k.removeprefix("module."): v for k, v in state.items()}, path)


def native_rgb(f2d: torch.Tensor, grid: int, factor: int = RGB_GRID_FACTOR) -> torch.Tensor:
    """The RGB tokens on their native grid from F2D replicated onto the G grid: (B, G², C) → (B, (G/f)², C)."""
    batch, _, channels = f2d.shape
    return f2d.reshape(batch, grid, grid, channels)[:, ::factor, ::factor].reshape(batch, -1, channels)


def scrambled_rgb_index(patches: int, tokens: int) -> torch.Tensor:
    """Which RGB token the reference's UFF training dump pairs with each of the ``patches`` grid positions.

    The dump tiles the tokens by ``repeat(4)`` → reshape(tokens, 4, ·) → permute, so position p reads token
    (r · (p mod tokens) + ⌊p / tokens⌋) mod tokens, r = patches / tokens (defect D1: 0.26 % of positions aligned).
    """
    position = torch.arange(patches)
    return (patches // tokens * (position % tokens) + position // tokens) % tokens


def uff_training_pairs(f3d: torch.Tensor, f2d: torch.Tensor, grid: int, pairs: str = "scrambled"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UFF's training pairs of a batch: (B, G², C3) point patches and the RGB patches paired with them.

    ``aligned``: the RGB token over the same place (as at test time); ``scrambled``: the reference's dump.
    """
    if pairs == "aligned":
        return f3d, f2d
    if pairs != "scrambled":
        raise ValueError(f"UFF training pairs are 'scrambled' or 'aligned', got {pairs!r}")
    tokens = native_rgb(f2d, grid)
    return f3d, tokens[:, scrambled_rgb_index(f3d.shape[1], tokens.shape[1])]


# --- banks and decision layer ------------------------------------------------------------------------------------

class NormalizedBank(MemoryBank):
    """A coreset of standardised patches (``features``) and the scalars (``mean``, ``std``) that standardise
    every query as the rows were: x' = (x − mean) / std."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DecisionLayerFusion(nn.Module):
    """Two linear one-class SVMs (scikit-learn's ``SGDOneClassSVM``): over the banks' image scores (D_a) and over
    the pixels of their maps (D_s). ``score_samples`` is x · coef (no bias), so the coefficients are all that is
    kept (buffers ``image_coef``, ``pixel_coef``, one per bank)."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.register_buffer("image_coef", torch.zeros(inputs, dtype=torch.float64))
        self.register_buffer("pixel_coef", torch.zeros(inputs, dtype=torch.float64))

    @staticmethod
    def fit_svm(features: np.ndarray) -> np.ndarray:
        from sklearn.linear_model import SGDOneClassSVM

        return SGDOneClassSVM(nu=SVM_NU, max_iter=SVM_MAX_ITER, random_state=SVM_SEED).fit(features).coef_

    def fit(self, image_features: torch.Tensor, pixel_features: torch.Tensor) -> None:
        """image_features (N, K) of the training images; pixel_features (M, K) of their pixels."""
        self.image_coef.copy_(torch.from_numpy(self.fit_svm(image_features.double().numpy())))
        self.pixel_coef.copy_(torch.from_numpy(self.fit_svm(pixel_features.double().numpy())))

    def image_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) → (B,) float64 ``D_a.score_samples``."""
        return features.double() @ self.image_coef

    def pixel_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(..., K) → (...) float64 ``D_s.score_samples``."""
        return features.double() @ self.pixel_coef


@dataclasses.dataclass
class BankScores:
    """One bank's verdict on a batch: image scores (B,), blurred maps (B, S, S)."""

    image: torch.Tensor
    maps: torch.Tensor


# --- the method ----------------------------------------------------------------------------------------------------

@register_detector
class M3DM(MemoryBankDetector):
    """``m3dm``: per-modality memory banks (points, RGB, and UFF-fused with ``uff=FILE``) and the DLF.

    Options (``--model_option``): ``coreset`` (fraction of the point bank kept, default 0.1; 1 keeps all),
    ``uff`` (a trained UFF file: the full method), ``decision`` (``svm``: the DLF; ``add``: sums),
    ``normalization`` and ``coreset_sizes`` (``reference`` or ``per_bank``), ``blur`` (``exact`` or
    ``pil8bit``), ``rgb_s_lambda`` and ``rgb_smap_lambda`` (the DLF's weights of the RGB bank's image scores and
    of its maps: the reference's flags of those names, 0.1 each; the score weight is 1 on the CNN presets,
    :data:`CNN_RGB_S_LAMBDA`).
    """

    name = "m3dm"
    modalities = ("rgbxyz", "rgb", "xyz")
    option_choices = {"coreset": float, "uff": Path, "decision": ("svm", "add"),
                      "normalization": ("reference", "per_bank"), "coreset_sizes": ("reference", "per_bank"),
                      "blur": ("exact", "pil8bit"), "rgb_s_lambda": float, "rgb_smap_lambda": float}
    presets = M3DM_PRESETS

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz", coreset: float = CORESET_FRACTION,
                 uff: Path | None = None, decision: str = "svm", normalization: str = "reference",
                 coreset_sizes: str = "reference", blur: str = "exact", rgb_s_lambda: float | None = None,
                 rgb_smap_lambda: float = DLF_WEIGHTS["rgb"]) -> None:
        super().__init__(config, modality)
        if not 0 < coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {coreset}")
        if config.grid_size % RGB_GRID_FACTOR or config.rgb_upsampling != "nearest":
            raise ValueError("m3dm needs its own presets (networks.methods.m3dm.M3DM_PRESETS): RGB tokens replicated "
                             f"{RGB_GRID_FACTOR} × {RGB_GRID_FACTOR} onto an even feature grid")
        if uff is not None and modality != "rgbxyz":
            raise ValueError("the UFF fuses both modalities: uff=FILE needs --modality rgbxyz")
        self.coreset, self.decision, self.blur = float(coreset), decision, blur
        # the DLF's inputs: the banks' image scores and maps, each weighted (image, map)
        if rgb_s_lambda is None:
            rgb_s_lambda = DLF_WEIGHTS["rgb"] if isinstance(config.rgb, ViTConfig) else CNN_RGB_S_LAMBDA
        self.score_weights = {**DLF_WEIGHTS, "rgb": float(rgb_s_lambda)}
        self.map_weights = {**DLF_WEIGHTS, "rgb": float(rgb_smap_lambda)}
        self.normalization, self.coreset_sizes = normalization, coreset_sizes
        self.uff_path = None if uff is None else Path(uff)
        names = {"rgbxyz": ("xyz", "rgb", "fusion") if uff is not None else ("xyz", "rgb"), "rgb": ("rgb",),
                 "xyz": ("xyz",)}[modality]
        dims = {"xyz": config.xyz_dim, "rgb": config.rgb_dim, "fusion": config.xyz_dim + config.rgb_dim}
        for name in names:  # attributes, so that each bank is a module of its own checkpoint file
            setattr(self, f"{name}_bank", NormalizedBank(dims[name]))
        self.bank_names = names
        self.uff = None if uff is None else FeatureFusionBlock(config.xyz_dim, config.rgb_dim)
        self.dlf = DecisionLayerFusion(len(names)) if len(names) > 1 and decision == "svm" else None

    def options(self) -> dict:
        uff = None
        if self.uff_path is not None:
            uff = ("sha256:" + hashlib.sha256(self.uff_path.read_bytes()).hexdigest()[:16]
                   if self.uff_path.is_file() else str(self.uff_path))
        options = {"coreset": self.coreset, "uff": uff, "decision": self.decision,
                   "normalization": self.normalization, "coreset_sizes": self.coreset_sizes, "blur": self.blur}
        if self.dlf is not None:  # the weights of the DLF's inputs change nothing without it
            options.update(rgb_s_lambda=self.score_weights["rgb"], rgb_smap_lambda=self.map_weights["rgb"])
        return options

    def bank(self, name: str) -> NormalizedBank:
        return getattr(self, f"{name}_bank")

    @property
    def rgb_grid(self) -> int:
        return self.config.grid_size // RGB_GRID_FACTOR

    @property
    def divisor(self) -> float:
        """The two-bank mode's 1000 (DINO+Point_MAE), 1 otherwise."""
        return TWO_BANK_DIVISOR if self.bank_names == ("xyz", "rgb") else 1.0

    # --- patches -------------------------------------------------------------------------------------------------

    def raw_patches(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each bank's unstandardised patches of a batch: xyz (B, G², C3), rgb (B, (G/2)², C2), fusion
        (B, G², C3 + C2)."""
        patches = {}
        if "xyz" in self.bank_names:
            patches["xyz"] = f3d.float()
        if "rgb" in self.bank_names:
            patches["rgb"] = native_rgb(f2d.float(), self.config.grid_size)
        if "fusion" in self.bank_names:
            patches["fusion"] = self.uff(f3d.float(), f2d.float())
        return patches

    # --- fitting -------------------------------------------------------------------------------------------------

    def fit(self, batches: Iterable[tuple]) -> dict[str, float]:
        """Every training patch of every bank (background included, as the reference), the standardisation, the
        coresets, then the DLF on the training samples scored against the finished banks."""
        if self.uff is not None:
            load_uff_checkpoint(self.uff, self.uff_path)
        raw: dict[str, list[torch.Tensor]] = {name: [] for name in self.bank_names}
        for f2d, f3d, *_ in batches:
            for name, patches in self.raw_patches(f2d, f3d).items():
                raw[name].append(patches.cpu())
        samples = {name: torch.cat(chunks) for name, chunks in raw.items()}  # (N, P_b, D_b)
        self._standardization(samples)
        statistics = {"training_samples": len(next(iter(samples.values())))}
        kept_points = None
        for name in self.bank_names:  # xyz first: the reference sizes the other coresets from its coreset
            bank = self.bank(name)
            rows = bank.standardize(samples[name].flatten(0, 1))
            size = int(self.coreset * len(rows))
            if self.coreset_sizes == "reference" and kept_points is not None:
                size = int(self.coreset * kept_points)
            keep = greedy_coreset_of_size(rows, size) if self.coreset < 1 else torch.arange(len(rows))
            chosen = rows[keep]
            if name == "xyz" and len(self.bank_names) > 1:  # the reference's clean-up: rows with a 0 dropped,
                chosen = torch.cat([chosen[(chosen != 0).all(dim=1)], chosen.new_zeros(1, chosen.shape[1])])
            bank.fill(chosen)
            kept_points = len(keep) if name == "xyz" else kept_points
            statistics[f"{name}_bank_size"] = bank.rows
        statistics["bank_megabytes"] = sum(self.bank(n).features.nelement() * 4 / 2**20 for n in self.bank_names)
        if self.dlf is not None:  # in-sample, as the reference: the training samples against their own banks
            scores = [self._bank_scores({name: samples[name][i : i + 1] for name in self.bank_names})
                      for i in range(statistics["training_samples"])]
            image = torch.stack([self._dlf_inputs([s[n].image for n in self.bank_names], self.score_weights)
                                 for s in scores])[:, 0]
            pixels = torch.cat([self._dlf_inputs([s[n].maps for n in self.bank_names], self.map_weights)
                                .reshape(-1, len(self.bank_names)) for s in scores])
            self.dlf.fit(image, pixels)
            statistics.update({f"dlf_image_coef_{n}": float(c) for n, c in zip(self.bank_names, self.dlf.image_coef)})
            statistics.update({f"dlf_pixel_coef_{n}": float(c) for n, c in zip(self.bank_names, self.dlf.pixel_coef)})
        return statistics

    def _standardization(self, samples: dict[str, torch.Tensor]) -> None:
        """The banks' scalars. Reference: with both modalities every bank uses the mean of all raw point-bank
        elements and the std of all raw RGB-bank elements; RGB alone its own; points alone none."""
        for name in self.bank_names:
            bank = self.bank(name)
            if self.modality == "xyz":
                continue
            if self.modality == "rgb" or self.normalization == "per_bank":
                mean, std = samples[name].mean(), samples[name].std()
            else:
                mean, std = samples["xyz"].mean(), samples["rgb"].std()
            bank.mean.fill_(float(mean))
            bank.std.fill_(float(std))

    # --- scoring -------------------------------------------------------------------------------------------------

    def _bank_scores(self, raw: dict[str, torch.Tensor]) -> dict[str, BankScores]:
        """Each bank's image scores and blurred maps of (B, P_b, D_b) unstandardised patches."""
        results = {}
        for name, patches in raw.items():
            bank = self.bank(name)
            if bank.rows == 0:
                raise RuntimeError("the M3DM memory banks are empty: fit them (train.py) or load a checkpoint")
            grid = self.rgb_grid if name == "rgb" else self.config.grid_size
            distances, images = [], []
            for sample in bank.standardize(patches.float().to(bank.features.device)):
                d, nearest = nearest_neighbours(sample, bank.features)
                distances.append(d[:, 0])
                images.append(reweighted_image_score(sample, d[:, 0], nearest[:, 0], bank.features,
                                                     REWEIGHT_NEIGHBOURS, self.divisor))
            maps = resize_map(torch.stack(distances).reshape(-1, grid, grid), self.config.img_size, "bilinear")
            results[name] = BankScores(torch.stack(images), self._blur(maps))
        return results

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(maps) if self.blur == "exact" else pil_blur_8bit(maps)

    def _dlf_inputs(self, values: list[torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """The banks' scores or maps stacked on a last axis, weighted (reference: xyz 1, rgb 0.1, fusion 1)."""
        return torch.stack([weights[n] * v.double() for n, v in zip(self.bank_names, values)], dim=-1)

    def distance_maps(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Each bank's blurred map at the image size, resized bilinearly to the feature grid: (B, G, G)."""
        return {name: resize_map(s.maps, self.config.grid_size, "bilinear")
                for name, s in self._bank_scores(self.raw_patches(f2d, f3d)).items()}

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """The banks' blurred maps (B, S, S) → the final map: one bank's own, the DLF's pixel scores, or the sum."""
        values = [maps[n] for n in self.bank_names]
        if len(values) == 1:
            return values[0]
        if self.dlf is None:
            return torch.stack(values).sum(dim=0)
        flat = self._dlf_inputs([v.reshape(-1) for v in values], self.map_weights)
        scores = torch.cat([self.dlf.pixel_scores(chunk) for chunk in flat.split(DLF_PIXEL_CHUNK)])
        return scores.reshape(values[0].shape).float()

    def predict(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                variant: str = "full", xyz: torch.Tensor | None = None) -> Prediction:
        """Image scores and maps: the single bank's, the DLF's (``svm``) or the sums (``add``)."""
        scores = self._bank_scores(self.raw_patches(f2d, f3d))
        heat = self.fuse({n: s.maps for n, s in scores.items()}, mask, variant)
        images = [scores[n].image for n in self.bank_names]
        if len(images) == 1:
            image = images[0]
        elif self.dlf is None:
            image = torch.stack(images).sum(dim=0)
        else:
            image = self.dlf.image_scores(self._dlf_inputs(images, self.score_weights)).float()
        return Prediction(image.float(), heat, heat)


def uff_cosine_schedule(step: int, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> float:
    """The reference's per-iteration learning-rate factor: linear warm-up for ``warmup_epochs``, then a half
    cycle of cosine to 0 at ``epochs``."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return epoch / warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
