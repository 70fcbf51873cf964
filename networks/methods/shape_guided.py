"""Shape-Guided dual memory (Chu et al., ICML 2023): a 3D expert's SDF codes guide an RGB memory.

What the reference computes (../shared/spec/peers.md) and how it maps onto the harness:

1. *Patches* (:func:`cut_patches`): the valid points of the 224² cloud, normalised as a whole (minus the per-axis
   minimum, divided by the x-range); farthest point sampling picks round(N · group_mul / 500) centres, each with
   its 500 nearest points; each patch centred at its mean and divided by its largest axis extent.
2. *3D expert* (:class:`SDFExpert`): a PointNet encoder gives each patch a 128-d code; an implicit decoder predicts
   the signed distance of a query point from the code. Trained per class Neural-Pull style
   (:func:`neural_pull_loss`) on patches of up to 20 training samples, or loaded from the authors' checkpoint
   (``--model_option sdf_checkpoint=FILE``, :func:`convert_shape_guided_checkpoint`).
3. *Memories*: every training patch's code (SDF memory), and the RGB features (F2D on the 28² grid) of the cells
   each patch covers, dilated by 2 cells (RGB memory, linked to the patches).
4. *Scores*: a test patch's code is rebuilt by OMP (3 atoms) from its 10 nearest SDF codes; s_sdf = the largest
   residual; the SDF map is |SDF| of the rebuilt code at the patch's points. Each foreground RGB cell is rebuilt
   by OMP (3 atoms) from its 5 nearest RGB features among those linked to the retrieved patches; s_rgb = the
   largest residual; the RGB map is the 28² residuals, bilinear to 224.
5. *Alignment*: on 25 training images scored leave-self-out, the RGB map is affinely mapped onto the SDF map's
   range (mean ± 3σ of the non-zero values); the final map is max(aligned RGB ≥ 0, SDF), blurred (σ = 4); the image
   score is s_sdf · s_rgb. ``--fusion sdf_only`` / ``rgb_only`` give the method's single-memory rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from tqdm import tqdm

from networks.blocks.fusion import resize_map
from networks.blocks.memory_bank import (
    MemoryBank, gaussian_blur, nearest_neighbours, orthogonal_matching_pursuit, pil_blur_8bit,
)
from networks.extractors.fpfh import FPFHConfig
from networks.extractors.point_mae import load_state_dict_checked, read_state_dict
from networks.extractors.point_ops import farthest_point_sample, knn_groups
from networks.extractors.resnet import ResNetConfig
from networks.features import PRESETS, ExtractorConfig
from networks.methods.detector import MemoryBankDetector, Prediction, register_detector

logger = logging.getLogger(__name__)

PATCH_POINTS = 500
GROUP_MUL = 10  # patches per point ≈ group_mul / 500 · N: each point lies in ~10 patches
EXPERT_GROUP_MUL = 5  # the expert's training patches
EXPERT_SAMPLES = 20  # training samples whose patches train the expert
SDF_NEIGHBOURS = 10
RGB_NEIGHBOURS = 5
OMP_ATOMS = 3
ALIGNMENT_SAMPLES = 25
CELL_DILATION = 2
PAIRWISE_EPS = 1e-12  # torch.nn.PairwiseDistance's eps, which the reference's residual norms add
# Neural-Pull queries: (share of the queries, noise σ in units of the distance to the 51st nearest patch point)
QUERY_NOISE = ((0.625, 0.5), (0.375, 1.0))
NOISE_NEIGHBOUR = 51
PATCH_GRID = 28
EXPERT_STEPS = 300  # batches of 32 patches: ≈2 min per class at lite size on a 2-core CPU (docs/methods.md)


@dataclass(frozen=True)
class ExpertConfig:
    """Sizes of the 3D expert. ``paper``: the reference's (its checkpoint loads); ``lite``: narrower, for CPUs."""

    conv: tuple[int, int, int] = (64, 128, 1024)
    fc: int = 512
    code: int = 128
    width: int = 512
    layers: int = 7


EXPERTS = {"paper": ExpertConfig(), "lite": ExpertConfig(conv=(64, 128, 256), fc=256, width=128, layers=4)}

SG_PRESETS = {
    "paper": ExtractorConfig(img_size=224, feature_size=PATCH_GRID, rgb=ResNetConfig("wide_resnet50_2", (1, 2)),
                             xyz=FPFHConfig(), stage_pooling="avg3"),
    "lite": dataclasses.replace(PRESETS["lite_fpfh"], feature_size=PATCH_GRID, stage_pooling="avg3"),
    "lite_fpfh": dataclasses.replace(PRESETS["lite_fpfh"], feature_size=PATCH_GRID, stage_pooling="avg3"),
}


# --- patches ---------------------------------------------------------------------------------------------------

def cut_patches(points: torch.Tensor, group_mul: int = GROUP_MUL, size: int = PATCH_POINTS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local patches of a cloud.

    Args:
        points: (N, 3) valid points.

    Returns:
        patches (P, size, 3) float32, each centred at its mean and divided by its largest axis extent, and
        (P, size) int64 indices into ``points``.

    Raises:
        ValueError: fewer than ``size`` points.
    """
    if len(points) < size:
        raise ValueError(f"too few valid points for Shape-Guided patches: {len(points)} < {size}")
    cloud = points.double()
    low = cloud.min(dim=0).values
    x_range = (cloud[:, 0].max() - low[0]).clamp(min=1e-12)
    cloud = (cloud - low) / x_range
    count = max(1, round(len(cloud) * group_mul / size))
    centres = farthest_point_sample(cloud, count)
    groups = knn_groups(cloud, cloud[centres], size)
    patches = cloud[groups]
    patches = patches - patches.mean(dim=1, keepdim=True)
    extent = (patches.max(dim=1).values - patches.min(dim=1).values).max(dim=1).values.clamp(min=1e-12)
    return (patches / extent[:, None, None]).float(), groups


def covered_cells(pixels: torch.Tensor, img_size: int, grid: int, dilation: int = CELL_DILATION) -> torch.Tensor:
    """The grid cells a patch's pixels fall in, dilated by ``dilation`` cells up, down, left and right (without
    wrapping across rows, unlike the reference's flat-index shift). Sorted unique flat cell indices."""
    scale = img_size // grid
    rows, cols = pixels // img_size // scale, pixels % img_size // scale
    cells = torch.unique(rows * grid + cols)
    rows, cols = cells // grid, cells % grid
    shifted = [(rows + dr, cols + dc) for dr, dc in
               ((0, 0), (dilation, 0), (-dilation, 0), (0, dilation), (0, -dilation))]
    return torch.unique(torch.cat([(r * grid + c)[(r >= 0) & (r < grid) & (c >= 0) & (c < grid)]
                                   for r, c in shifted]))


# --- the 3D expert ---------------------------------------------------------------------------------------------

class PointNetEncoder(nn.Module):
    """Conv1d 3 → 64 → 128 → 1024 (BatchNorm, ReLU), max over points, Linear 1024 → 512 → 128 (BatchNorm, ReLU):
    (B, n, 3) patches → (B, 128) codes. Attribute names are the reference's ``encoder_BN``."""

    def __init__(self, config: ExpertConfig) -> None:
        super().__init__()
        c1, c2, c3 = config.conv
        self.conv1, self.conv2, self.conv3 = nn.Conv1d(3, c1, 1), nn.Conv1d(c1, c2, 1), nn.Conv1d(c2, c3, 1)
        self.fc1, self.fc2 = nn.Linear(c3, config.fc), nn.Linear(config.fc, config.code)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(c1), nn.BatchNorm1d(c2), nn.BatchNorm1d(c3)
        self.bn4, self.bn5 = nn.BatchNorm1d(config.fc), nn.BatchNorm1d(config.code)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.transpose(1, 2)
        for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(norm(conv(x)))
        x = x.amax(dim=2)
        return F.relu(self.bn5(self.fc2(F.relu(self.bn4(self.fc1(x))))))


class ImplicitSDF(nn.Module):
    """The reference's ``local_NIF``: ReLU(fc1(code)) and ReLU(fc2(point)) concatenated → fc3 → ``layers``
    weight-normalised Linear(512, 512) + ReLU → fc5 → the signed distance. Geometric initialisation: hidden
    weights ~ N(0, √2/√512), biases 0; the last layer's weights ~ N(2√π/√512, 1e-6) and bias −0.5 (an SDF that
    starts as a sphere).

    (B, n, code) codes and (B, n, 3) points → (B, n, 1).
    """

    def __init__(self, config: ExpertConfig) -> None:
        super().__init__()
        width = config.width
        self.fc1, self.fc2 = nn.Linear(config.code, width), nn.Linear(3, width)
        self.fc3 = self._geometric(nn.Linear(2 * width, width))
        self.layers = config.layers
        for i in range(config.layers):
            setattr(self, f"fc4{i}", weight_norm(self._geometric(nn.Linear(width, width))))
        self.fc5 = nn.Linear(width, 1)
        nn.init.constant_(self.fc5.bias, -0.5)
        nn.init.normal_(self.fc5.weight, mean=2 * math.sqrt(math.pi) / math.sqrt(width), std=1e-6)

    @staticmethod
    def _geometric(layer: nn.Linear) -> nn.Linear:
        nn.init.constant_(layer.bias, 0.0)
        nn.init.normal_(layer.weight, 0.0, math.sqrt(2) / math.sqrt(layer.out_features))
        return layer

    def forward(self, codes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc3(torch.cat([F.relu(self.fc2(points)), F.relu(self.fc1(codes))], dim=-1)))
        for i in range(self.layers):
            x = F.relu(getattr(self, f"fc4{i}")(x))
        return self.fc5(x)


class SDFExpert(nn.Module):
    """The 3D expert: ``encoder`` (patch → code) and ``NIF`` (code, point → signed distance)."""

    def __init__(self, config: ExpertConfig = ExpertConfig()) -> None:
        super().__init__()
        self.encoder = PointNetEncoder(config)
        self.NIF = ImplicitSDF(config)

    def sdf(self, codes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(B, code) codes and (B, n, 3) points → (B, n) signed distances."""
        return self.NIF(codes[:, None].expand(-1, points.shape[1], -1), points)[..., 0]

    def pull(self, codes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Neural-Pull projection q − SDF(q) · ∇SDF(q)/‖∇SDF(q)‖ (norm with 1e-12 inside the root), differentiable."""
        queries = queries.requires_grad_(True)
        distance = self.sdf(codes, queries)
        gradient, = torch.autograd.grad(distance, queries, torch.ones_like(distance), create_graph=True)
        norm = torch.sqrt((gradient**2).sum(dim=-1, keepdim=True) + 1e-12)
        return queries - distance[..., None] * gradient / norm


def neural_pull_queries(patches: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy queries around the patch points and their nearest patch points.

    Each point gives one query: p + σ·s·N(0, I), σ = its distance to its 51st nearest patch point (itself counted
    first), s = 0.5 for a random 62.5 % of the points and 1.0 for the rest.

    Args:
        patches: (B, n, 3).

    Returns:
        queries (B, n, 3) and targets (B, n, 3).
    """
    batch, count, _ = patches.shape
    distances = torch.cdist(patches, patches)
    sigma = distances.topk(min(NOISE_NEIGHBOUR, count), dim=-1, largest=False).values[..., -1:]
    order = torch.rand(batch, count, generator=generator).argsort(dim=1).to(patches.device)
    near = order < round(QUERY_NOISE[0][0] * count)
    scale = torch.where(near, QUERY_NOISE[0][1], QUERY_NOISE[1][1])[..., None]
    queries = patches + sigma * scale * torch.randn(patches.shape, generator=generator).to(patches.device)
    nearest = torch.cdist(queries, patches).argmin(dim=-1)
    return queries, torch.gather(patches, 1, nearest[..., None].expand(-1, -1, 3))


def neural_pull_loss(expert: SDFExpert, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean ‖target − pull(query)‖₂; the code is the encoder's of the targets (the reference encodes the nearest
    surface points of its queries)."""
    return torch.linalg.vector_norm(targets - expert.pull(expert.encoder(targets), queries), dim=-1).mean()


def convert_shape_guided_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' ``ckpt_000601.pth`` (``{"sdf_model": state_dict}``, old-style weight norm ``weight_g`` /
    ``weight_v``) → this module's keys (parametrised weight norm ``parametrizations.weight.original0/1``)."""
    if "sdf_model" in state and isinstance(state["sdf_model"], Mapping):
        state = state["sdf_model"]
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", key.removeprefix("module."))
        renamed[re.sub(r"\.weight_v$", ".parametrizations.weight.original1", key)] = value
    return renamed


def load_expert_checkpoint(expert: SDFExpert, path: Path) -> None:
    """Load a trained expert (the authors' ``ckpt_000601.pth`` or one of ours) with strict=True."""
    state = read_state_dict(path, ("sdf_model",), " (Shape-Guided's authors ship checkpoint/best_ckpt/"
                                                  "ckpt_000601.pth in their repository)")
    load_state_dict_checked(expert, convert_shape_guided_checkpoint(state), path)


# --- the memories ----------------------------------------------------------------------------------------------

class ShapeGuidedMemory(MemoryBank):
    """The SDF memory (``features``: one code per training patch), each patch's linked RGB memory rows (CSR:
    ``link_offsets`` (M + 1,), ``link_rows``), the RGB memory (``rgb``: (R, C2)) and the alignment (weight, bias)."""

    def __init__(self, code: int, rgb_dim: int) -> None:
        super().__init__(code)
        self.register_buffer("link_offsets", torch.zeros(1, dtype=torch.long))
        self.register_buffer("link_rows", torch.zeros(0, dtype=torch.long))
        self.register_buffer("rgb", torch.zeros(0, rgb_dim))
        self.register_buffer("alignment", torch.tensor([1.0, 0.0]))

    def linked_rows(self, patches: torch.Tensor) -> torch.Tensor:
        """The RGB memory rows linked to the given SDF memory patches (unique, sorted)."""
        starts, stops = self.link_offsets[patches], self.link_offsets[patches + 1]
        return torch.unique(torch.cat([self.link_rows[a:b] for a, b in zip(starts.tolist(), stops.tolist())]))


@dataclass
class SampleScores:
    sdf_map: torch.Tensor  # (S, S), 0 where no patch
    rgb_map: torch.Tensor  # (S, S)
    sdf_score: torch.Tensor
    rgb_score: torch.Tensor


@register_detector
class ShapeGuided(MemoryBankDetector):
    """``shape_guided``: the 3D expert and the dual memory (docs/methods.md).

    Options: ``expert`` — ``auto`` (the reference's sizes with the paper preset, the narrow ``lite`` expert
    otherwise), ``paper`` or ``lite``; ``expert_steps`` — training steps of the expert (batches of 32 patches);
    ``sdf_checkpoint`` — a trained expert file (the authors' ``ckpt_000601.pth``), which is then not trained;
    ``blur`` — ``exact`` or ``pil8bit`` (as BTF).
    """

    name = "shape_guided"
    modalities = ("rgbxyz",)
    needs_clouds = True
    fusion_variants = ("full", "sdf_only", "rgb_only")
    variant_modalities = {"sdf_only": "xyz", "rgb_only": "rgb"}
    option_choices = {"expert": ("auto", "paper", "lite"), "expert_steps": int, "sdf_checkpoint": Path,
                      "blur": ("exact", "pil8bit")}
    presets = SG_PRESETS
    expert_batch = 32
    expert_lr = 1e-4

    def __init__(self, config: ExtractorConfig, modality: str = "rgbxyz", expert: str = "auto",
                 expert_steps: int = EXPERT_STEPS, sdf_checkpoint: Path | None = None, blur: str = "exact") -> None:
        super().__init__(config, modality)
        if expert == "auto":
            expert = "paper" if config == SG_PRESETS["paper"] else "lite"
        self.expert_size, self.expert_steps, self.blur = expert, int(expert_steps), blur
        self.sdf_checkpoint = None if sdf_checkpoint is None else Path(sdf_checkpoint)
        self.expert = SDFExpert(EXPERTS[expert])
        self.memory = ShapeGuidedMemory(EXPERTS[expert].code, config.rgb_dim)

    def options(self) -> dict:
        source = "trained"
        if self.sdf_checkpoint is not None and self.sdf_checkpoint.is_file():
            source = "sha256:" + hashlib.sha256(self.sdf_checkpoint.read_bytes()).hexdigest()[:16]
        return {"expert": self.expert_size, "expert_steps": self.expert_steps if source == "trained" else 0,
                "expert_source": source, "blur": self.blur}

    # --- fitting -----------------------------------------------------------------------------------------------

    def _points(self, cloud: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid points (a pixel with all coordinates non-zero, the MVTec rule) and their flat pixel indices."""
        flat = cloud.reshape(3, -1).T
        pixels = torch.nonzero((flat != 0).all(dim=1)).squeeze(1)
        return flat[pixels].float(), pixels

    def train_expert(self, clouds: list[torch.Tensor]) -> float:
        """Neural-Pull training on the patches (group_mul 5) of the first 20 clouds; returns the last 50 steps'
        mean loss."""
        patches = torch.cat([cut_patches(self._points(c)[0], EXPERT_GROUP_MUL)[0] for c in clouds[:EXPERT_SAMPLES]])
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.Adam(self.expert.parameters(), lr=self.expert_lr, betas=(0.9, 0.999))
        self.expert.train()
        recent: list[float] = []
        progress = tqdm(range(self.expert_steps), desc="SDF expert", unit="step", leave=False)
        for _ in progress:
            pick = torch.randint(len(patches), (min(self.expert_batch, len(patches)),), generator=generator)
            queries, targets = neural_pull_queries(patches[pick], generator)
            with torch.enable_grad():
                loss = neural_pull_loss(self.expert, queries, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            recent = (recent + [loss.item()])[-50:]
            progress.set_postfix(loss=f"{np.mean(recent):.5f}")
        self.expert.eval()
        return float(np.mean(recent)) if recent else float("nan")

    def fit(self, batches: Iterable[tuple]) -> dict[str, float]:
        """Train (or load) the expert, build both memories, then align the RGB scores to the SDF scores."""
        device = self.memory.features.device  # everything on the method's device
        rgb_grids, clouds = [], []
        for f2d, _, _, xyz in batches:
            rgb_grids.extend(f2d.to(device))
            clouds.extend(xyz.to(device))
        statistics: dict[str, float] = {}
        if self.sdf_checkpoint is not None:
            load_expert_checkpoint(self.expert, self.sdf_checkpoint)
        else:
            statistics["expert_loss"] = self.train_expert(clouds)
        self.expert.eval()
        cells_per_image = self.config.grid_size**2
        codes, links, samples = [], [], []
        for index, cloud in enumerate(tqdm(clouds, desc="memories", unit="sample", leave=False)):
            sample = self._patches(cloud)
            samples.append(sample)
            codes.append(sample["codes"])
            links.extend(index * cells_per_image + cells for cells in sample["cells"])
        used = torch.unique(torch.cat(links))
        row_of = torch.full((len(clouds) * cells_per_image,), -1, dtype=torch.long, device=device)
        row_of[used] = torch.arange(len(used), device=device)
        lengths = torch.tensor([len(cells) for cells in links], device=device)
        memory = self.memory
        memory.fill(torch.cat(codes))
        memory.link_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lengths.cumsum(0)])
        memory.link_rows = row_of[torch.cat(links)]
        memory.rgb = torch.cat(rgb_grids)[used].float()
        memory.alignment = self._alignment(rgb_grids[:ALIGNMENT_SAMPLES], samples[:ALIGNMENT_SAMPLES])
        return {**statistics, "sdf_memory": memory.rows, "rgb_memory": len(memory.rgb),
                "alignment_weight": float(memory.alignment[0]), "alignment_bias": float(memory.alignment[1]),
                "bank_megabytes": sum(b.nelement() * b.element_size() for b in memory.buffers()) / 2**20}

    def _alignment(self, rgb_grids: list[torch.Tensor], samples: list[dict]) -> torch.Tensor:
        """(weight, bias) mapping the RGB map's range onto the SDF map's, from leave-self-out scores: range =
        mean ± 3σ of the non-zero values of the blurred maps of all alignment images together."""
        sdf_values, rgb_values = [], []
        for grid, sample in zip(rgb_grids, samples):
            scores = self._score(grid, sample, leave_self_out=True)
            for heat, values in ((scores.sdf_map, sdf_values), (scores.rgb_map, rgb_values)):
                blurred = self._blur(heat[None])[0].double()
                values.append(blurred[blurred != 0])
        lower, upper = {}, {}
        for name, values in (("sdf", sdf_values), ("rgb", rgb_values)):
            values = torch.cat(values)
            mean, std = values.mean(), values.std(unbiased=False)
            lower[name], upper[name] = mean - 3 * std, mean + 3 * std
        weight = (upper["sdf"] - lower["sdf"]) / (upper["rgb"] - lower["rgb"])
        return torch.stack([weight, lower["sdf"] - weight * lower["rgb"]]).float()

    # --- scoring -----------------------------------------------------------------------------------------------

    def _patches(self, cloud: torch.Tensor) -> dict:
        """A sample's patches, their pixels, codes and covered RGB cells."""
        points, pixels = self._points(cloud)
        patches, groups = cut_patches(points)
        with torch.no_grad():
            codes = torch.cat([self.expert.encoder(chunk) for chunk in patches.split(256)])
        size, grid = self.config.img_size, self.config.grid_size
        return {"patches": patches, "pixels": pixels[groups], "codes": codes,
                "cells": [covered_cells(p, size, grid) for p in pixels[groups]]}

    def _score(self, rgb_grid: torch.Tensor, sample: dict, leave_self_out: bool = False) -> SampleScores:
        """SDF and RGB maps and scores of one sample; ``leave_self_out``: skip each search's nearest entry (the
        sample's own, for training images in the memory)."""
        memory, skip = self.memory, int(leave_self_out)
        size = self.config.img_size
        codes = sample["codes"]
        _, near = nearest_neighbours(codes, memory.features, k=min(SDF_NEIGHBOURS + skip, memory.rows))
        near = near[:, skip:]
        atoms = memory.features[near]
        rebuilt = (orthogonal_matching_pursuit(codes, atoms, OMP_ATOMS)[:, None] @ atoms.double())[:, 0].float()
        sdf_score = torch.linalg.vector_norm(codes - rebuilt + PAIRWISE_EPS, dim=1).max()
        with torch.no_grad():
            distances = torch.cat([self.expert.sdf(c, p).abs() for c, p in
                                   zip(rebuilt.split(64), sample["patches"].split(64))])
        sdf_map = torch.full((size * size,), math.inf, device=codes.device)
        sdf_map.scatter_reduce_(0, sample["pixels"].reshape(-1), distances.reshape(-1), reduce="amin")
        sdf_map = torch.where(torch.isinf(sdf_map), 0.0, sdf_map).reshape(size, size)

        grid = self.config.grid_size
        candidates = memory.rgb[memory.linked_rows(torch.unique(near))]
        cells = torch.unique(torch.cat(sample["cells"]))
        features = rgb_grid[cells].float()
        _, nearest = nearest_neighbours(features, candidates, k=min(RGB_NEIGHBOURS + skip, len(candidates)))
        atoms = candidates[nearest[:, skip:]]
        rebuilt = (orthogonal_matching_pursuit(features, atoms, OMP_ATOMS)[:, None] @ atoms.double())[:, 0].float()
        residual = torch.zeros(grid * grid, device=features.device)
        residual[cells] = torch.linalg.vector_norm(features - rebuilt + PAIRWISE_EPS, dim=1)
        rgb_map = resize_map(residual.reshape(1, grid, grid), size, "bilinear")[0]
        return SampleScores(sdf_map, rgb_map, sdf_score, residual.max())

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(maps) if self.blur == "exact" else pil_blur_8bit(maps)

    def distance_maps(self, f2d, f3d, mask):  # noqa: ANN001 - the maps need the clouds: see predict
        raise TypeError("shape_guided scores from the point clouds: use predict(..., xyz=...)")

    def fuse(self, maps: dict[str, torch.Tensor], valid: torch.Tensor, variant: str = "full") -> torch.Tensor:
        """The final map: max(clip(RGB · weight + bias, ≥ 0), SDF) (or one memory's map), blurred (σ = 4)."""
        if variant == "sdf_only":
            return self._blur(maps["sdf"])
        if variant == "rgb_only":
            return self._blur(maps["rgb"])
        weight, bias = self.memory.alignment
        return self._blur(torch.maximum((maps["rgb"] * weight + bias).clamp(min=0), maps["sdf"]))

    def predict(self, f2d: torch.Tensor | None, f3d: torch.Tensor | None, mask: torch.Tensor,
                variant: str = "full", xyz: torch.Tensor | None = None) -> Prediction:
        """Per sample: the patches of its cloud, both memories' maps and scores, fused; image score s_sdf · s_rgb
        (``sdf_only``: s_sdf; ``rgb_only``: s_rgb)."""
        if xyz is None:
            raise ValueError("shape_guided needs the point clouds (xyz)")
        if self.memory.rows == 0:
            raise RuntimeError("the Shape-Guided memories are empty: fit them (train.py) or load a checkpoint")
        device = self.memory.features.device
        scores = [self._score(grid, self._patches(cloud)) for grid, cloud in zip(f2d.to(device), xyz.to(device))]
        maps = {"sdf": torch.stack([s.sdf_map for s in scores]), "rgb": torch.stack([s.rgb_map for s in scores])}
        heat = self.fuse(maps, mask, variant)
        sdf_scores, rgb_scores = (torch.stack([getattr(s, n) for s in scores]) for n in ("sdf_score", "rgb_score"))
        image = {"full": sdf_scores * rgb_scores, "sdf_only": sdf_scores, "rgb_only": rgb_scores}[variant]
        return Prediction(image, heat, heat)
