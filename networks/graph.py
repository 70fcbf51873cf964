"""A trained detector and its frozen extractors as one graph, from the input tensors to the anomaly map and the
image score: what ``export.py`` writes to ONNX (docs/inspecting.md, "One file for the line").

The graph computes what the PyTorch path computes (:class:`utils.station.predictor.Predictor`), batched: the RGB
backbone's grids resized to the feature grid, the geometry images' CNN features on the grid and zeroed off the
cloud's footprint, the valid cells, the method's maps, fusion and the reference's normalisations. Its inputs, by
modality (:data:`GRAPH_INPUTS`):

* ``image``: (B, 3, S, S) float32, normalised with the preset's mean / std (``rgb`` and ``rgbxyz``);
* ``cloud``: (B, 3, S, S) float32 organised cloud in the dataset's units, (0, 0, 0) where there is no point
  (``xyz`` and ``rgbxyz``);
* ``valid``: (B, S, S) float32, 1 on the pixels to score (``rgb``: the cloud's foreground where there is a cloud,
  otherwise the image's own area inside the padding that squares it).

Outputs: ``anomaly_map`` (B, S, S) and ``score`` (B,). The graph holds a copy of the method in which the
stride-1 transposed convolutions (Decoder2D's) are the equivalent plain convolutions (:func:`as_convolution`) and
the strided ones (Decoder3D's) their polyphase plain convolutions (:class:`PolyphaseConvTranspose1d`): onnxruntime
runs ``ConvTranspose`` several times as slowly as ``Conv`` on a CPU, and fuses a ``Conv`` with its BatchNorm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from networks.extractors.geometry_images import GeometryImagesExtractor
from networks.features import MultimodalFeatures, footprint_mask, grid_feature_maps
from networks.methods.detector import Detector, MemoryBankDetector

GRAPH_INPUTS = {"rgbxyz": ("image", "cloud"), "rgb": ("image", "valid"), "xyz": ("cloud",)}
GRAPH_OUTPUTS = ("anomaly_map", "score")


class NotExportableError(ValueError):
    """The run's computation cannot be one graph (the message says why and what to use instead)."""


def export_problem(extractor: MultimodalFeatures, model: Detector) -> str | None:
    """Why ``model`` on ``extractor`` cannot be one graph, or None when it can."""
    if isinstance(model, MemoryBankDetector):
        return (f"{model.name} is a memory-bank method: it scores by a nearest-neighbour search over banks fitted "
                "per class (and BTF / Shape-Guided read FPFH, numpy work on each cloud); the exported graph holds "
                "trained networks only (cmdr, cfm, mafr)")
    if "3d" in model.branches:
        backbone = extractor.xyz_backbone
        if not isinstance(backbone, GeometryImagesExtractor):
            kind = type(backbone).__name__
            return (f"the 3D branch {kind} is not tensor work of a fixed shape (Point-MAE samples a varying number "
                    "of valid points, FPFH runs in numpy): export a run trained with --preset lite (geometry "
                    "images)")
        if backbone.fpfh is not None:
            return "these geometry images concatenate FPFH (numpy work on each cloud): export a run without FPFH"
    return None


def _is_plain(layer: nn.ConvTranspose2d) -> bool:
    """Whether a transposed convolution has a plain equal: stride 1, no dilation, output padding or groups."""
    return layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.output_padding == (0, 0) and layer.groups == 1


def as_convolution(layer: nn.ConvTranspose2d) -> nn.Conv2d:
    """The plain convolution equal to a stride-1 transposed one: the kernel flipped in space with its in / out
    channels swapped, padding k − 1 − p.

    Raises:
        ValueError: a stride, dilation, output padding or groups other than 1 / 0 (no such plain convolution).
    """
    if not _is_plain(layer):
        raise ValueError("only a stride-1, undilated, ungrouped transposed convolution is a plain convolution")
    padding = tuple(k - 1 - p for k, p in zip(layer.kernel_size, layer.padding))
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, padding=padding,
                     bias=layer.bias is not None).to(layer.weight)
    with torch.no_grad():
        conv.weight.copy_(layer.weight.transpose(0, 1).flip(2, 3))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


class PolyphaseConvTranspose1d(nn.Module):
    """A strided ``ConvTranspose1d`` as ``stride`` plain convolutions whose outputs interleave (the polyphase form):
    output position s·m + r is a convolution of the input with the kernel taps j ≡ r + padding (mod s). The same
    values as the transposed convolution (float64: to rounding); onnxruntime runs a strided ``ConvTranspose`` on a
    CPU several times as slowly as the plain ``Conv``s.

    Args:
        layer: the transposed convolution (no dilation, output padding or groups).
    """

    def __init__(self, layer: nn.ConvTranspose1d) -> None:
        super().__init__()
        if layer.dilation != (1,) or layer.output_padding != (0,) or layer.groups != 1:
            raise ValueError("only an undilated, ungrouped transposed convolution without output padding")
        (kernel,), (stride,), (padding,) = layer.kernel_size, layer.stride, layer.padding
        self.stride, self.kernel, self.padding = stride, kernel, padding
        self.phases = nn.ModuleList()
        self.offsets: list[int] = []
        for phase in range(stride):
            first = (phase + padding) % stride
            taps = list(range(first, kernel, stride))
            conv = nn.Conv1d(layer.in_channels, layer.out_channels, len(taps), bias=layer.bias is not None)
            with torch.no_grad():  # out_r[m] = Σ_q x[m + c − q] w[first + s q]: a correlation with the taps reversed
                conv.weight.copy_(layer.weight[:, :, taps].transpose(0, 1).flip(-1))
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            self.phases.append(conv.to(layer.weight))
            self.offsets.append((phase + padding - first) // stride - (len(taps) - 1))  # input index of m = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) → (B, C', (L − 1)·s − 2p + k)."""
        length = x.shape[-1]
        out_length = (length - 1) * self.stride - 2 * self.padding + self.kernel
        outputs = []
        for phase, (conv, offset) in enumerate(zip(self.phases, self.offsets)):
            count = -(-(out_length - phase) // self.stride)  # outputs of this phase
            taps = conv.kernel_size[0]
            left, right = max(0, -offset), max(0, offset + count - 1 + taps - length)
            window = F.pad(x, (left, right))[..., offset + left : offset + left + count + taps - 1]
            outputs.append(conv(window))
        if out_length % self.stride:  # the last phases have one output fewer: pad to interleave, then cut
            outputs = [F.pad(o, (0, outputs[0].shape[-1] - o.shape[-1])) for o in outputs]
        return torch.stack(outputs, dim=-1).flatten(-2)[..., :out_length]


def _convolutions_for_transposed(module: nn.Module) -> None:
    """Replace (in place) every stride-1 ``ConvTranspose2d`` under ``module`` by :func:`as_convolution` and every
    ``ConvTranspose1d`` by :class:`PolyphaseConvTranspose1d`."""
    for name, child in module.named_children():
        if isinstance(child, nn.ConvTranspose2d) and _is_plain(child):
            setattr(module, name, as_convolution(child))
        elif isinstance(child, nn.ConvTranspose1d):
            setattr(module, name, PolyphaseConvTranspose1d(child))
        else:
            _convolutions_for_transposed(child)


class DetectorGraph(nn.Module):
    """The graph of a trained run (see the module docstring for inputs and outputs).

    Args:
        extractor: the run's frozen extractors (eval mode).
        model: the trained method (eval mode).

    Raises:
        NotExportableError: :func:`export_problem` has a reason.
    """

    def __init__(self, extractor: MultimodalFeatures, model: Detector) -> None:
        super().__init__()
        problem = export_problem(extractor, model)
        if problem is not None:
            raise NotExportableError(problem)
        self.extractor = extractor.eval()
        self.model = copy.deepcopy(model).eval()  # the run's own model is left as it is
        _convolutions_for_transposed(self.model)
        self.model.valid_rows_only = False  # a fixed-shape graph computes every pixel (the valid ones are the same)
        self.eval()
        self.input_names = GRAPH_INPUTS[model.modality]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.input_names, inputs, strict=True))
        extractor, grid = self.extractor, self.extractor.grid_size
        f2d = extractor.rgb_maps(extractor.rgb_grids(named["image"])) if "image" in named else None
        f3d = None
        if "cloud" in named:
            cloud = named["cloud"]
            valid = (cloud != 0).all(dim=1)  # the MVTec 3D-AD rule: a missing point is (0, 0, 0)
            f3d = grid_feature_maps(extractor.xyz_backbone(cloud, valid).float(), footprint_mask(valid, grid), grid)
            mask = (f3d != 0).any(dim=-1)
        else:
            mask = footprint_mask(named["valid"] > 0, grid)
        prediction = self.model.predict(f2d, f3d, mask)
        return prediction.maps, prediction.image_scores
