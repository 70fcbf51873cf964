"""Wide-ResNet-50-2 stage features: the RGB extractor of BTF and Shape-Guided at paper size (docs/methods.md).

Both methods take ImageNet-trained ``wide_resnet50_2`` from timm, frozen (BatchNorm in eval), and read intermediate
stages in timm's ``features_only`` numbering (0: the stem at stride 2, 1: layer1 (256 channels, stride 4),
2: layer2 (512, stride 8), 3: layer3 (1024, stride 16), 4: layer4): BTF stages 2 + 3, Shape-Guided 1 + 2. Each
stage output goes through a 3×3 average pool (stride 1, no padding) and an adaptive average pool to 28×28
(:func:`combine_stages`). The weights come from a file the user gives (``--rgb_weights``: a timm or torchvision
state dict, same key names) or from the timm hub where it can be reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from networks.extractors.point_mae import WeightsError, load_state_dict_checked, read_state_dict
from networks.normalization import IMAGENET_MEAN, IMAGENET_STD

# Output width of timm's features_only stages 0..4 of the ResNets used here.
STAGE_CHANNELS: dict[str, tuple[int, ...]] = {
    "wide_resnet50_2": (64, 256, 512, 1024, 2048),
    "resnet18": (64, 64, 128, 256, 512),  # small stand-in for tests
}
STAGE_POOLINGS = ("bilinear", "avg3")


@dataclass(frozen=True)
class ResNetConfig:
    """A timm ResNet read at some stages.

    Attributes:
        architecture: timm model name without a tag (a key of :data:`STAGE_CHANNELS`).
        stages: increasing features_only stage indices (BTF: (2, 3); Shape-Guided: (1, 2)).
        hub_tag: the timm pretrained tag used when no weights file is given and the hub can be reached
            (``racm_in1k``: the default ``wide_resnet50_2`` weights of the timm releases BTF was written for).
    """

    architecture: str = "wide_resnet50_2"
    stages: tuple[int, ...] = (2, 3)
    hub_tag: str = "racm_in1k"

    def __post_init__(self) -> None:
        if self.architecture not in STAGE_CHANNELS:
            raise ValueError(f"unknown ResNet {self.architecture!r}; choose from {sorted(STAGE_CHANNELS)}")
        if not self.stages or list(self.stages) != sorted(set(self.stages)) or not 0 <= self.stages[-1] < 5:
            raise ValueError(f"stages must be increasing indices in 0..4, got {self.stages}")

    @property
    def embed_dim(self) -> int:
        """Feature width: the sum of the chosen stages' widths (1536 for stages 2 + 3 of Wide-ResNet-50-2)."""
        return sum(STAGE_CHANNELS[self.architecture][s] for s in self.stages)

    @property
    def timm_name(self) -> str:
        return f"{self.architecture}.{self.hub_tag}"

    # ImageNet-trained: ImageNet normalisation.
    mean = IMAGENET_MEAN
    std = IMAGENET_STD


def combine_stages(outputs: list[torch.Tensor], pooling: str = "bilinear", grid: int | None = None) -> torch.Tensor:
    """Stage outputs (B, C_i, h_i, w_i), finest first, on one grid and concatenated along channels.

    ``bilinear``: the coarser stages resized bilinearly (align_corners=False) to the finest stage's grid.
    ``avg3`` (BTF and Shape-Guided): every stage through AvgPool2d(3, stride 1, no padding), then
    AdaptiveAvgPool2d to ``grid`` × ``grid`` (28 in both references).
    """
    if pooling == "bilinear":
        size = outputs[0].shape[-2:]
        return torch.cat([outputs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                         for o in outputs[1:]], dim=1)
    if pooling == "avg3":
        if grid is None:
            raise ValueError("avg3 stage pooling needs the grid size")
        return torch.cat([F.adaptive_avg_pool2d(F.avg_pool2d(o, kernel_size=3, stride=1), grid) for o in outputs],
                         dim=1)
    raise ValueError(f"unknown stage pooling {pooling!r}; choose from {STAGE_POOLINGS}")


def load_resnet_weights(model: nn.Module, path: str | Path) -> None:
    """Load a timm or torchvision ResNet state dict (``.pth``/``.safetensors``; same key names) with strict=True."""
    state = read_state_dict(path, hint=" (--rgb_weights: a timm or torchvision wide_resnet50_2 state dict)")
    load_state_dict_checked(model, {k.removeprefix("module."): v for k, v in state.items()}, path)


def build_resnet(config: ResNetConfig, random_init: bool = False, weights: str | Path | None = None) -> nn.Module:
    """The full timm ResNet with weights from ``weights``, the timm hub, or (``random_init`` only) at random."""
    if weights is not None:
        model = timm.create_model(config.architecture, pretrained=False)
        load_resnet_weights(model, weights)
        return model
    if random_init:
        return timm.create_model(config.architecture, pretrained=False)
    try:
        return timm.create_model(config.timm_name, pretrained=True)
    except Exception as err:  # offline, hub errors, corrupted cache
        raise WeightsError(
            f"could not get the pretrained weights of {config.timm_name} from the timm hub ({type(err).__name__}: "
            f"{err}). Offline, save them on a connected machine (`timm.create_model('{config.timm_name}', "
            "pretrained=True).state_dict()`, or torchvision's wide_resnet50_2 file) and pass --rgb_weights FILE"
        ) from None


class ResNetFeatures(nn.Module):
    """The stem and the layers up to the last requested stage of a timm ResNet (the rest is dropped).

    Args:
        network: the full timm ResNet (weights loaded).
        stages: features_only stage indices whose outputs are returned.
        pooling, grid: how the stages meet on one grid (:func:`combine_stages`).
    """

    def __init__(self, network: nn.Module, stages: tuple[int, ...], pooling: str = "avg3", grid: int = 28) -> None:
        super().__init__()
        self.stem = nn.Sequential(network.conv1, network.bn1, network.act1)
        self.maxpool = network.maxpool
        self.layers = nn.ModuleList([getattr(network, f"layer{i}") for i in range(1, max(stages[-1], 1) + 1)])
        self.stages = stages
        self.pooling, self.grid = pooling, grid

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images → (B, C, g, g): g = the grid for ``avg3``, else S / (the first stage's
        stride)."""
        x = self.stem(rgb)
        outputs = [x] if 0 in self.stages else []
        x = self.maxpool(x)
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if index in self.stages:
                outputs.append(x)
        return combine_stages(outputs, self.pooling, self.grid)
