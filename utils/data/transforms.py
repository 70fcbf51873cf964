"""The input transforms of the reference implementation (docs/data.md, "Data layout and loading").

* RGB: centred edge-replicate pad to a square, bicubic resize (PIL, as torchvision does for PIL
  images), scale to [0, 1], ImageNet normalisation.
* Organized point cloud: centred zero padding to a square (a no-op for background-removed MVTec 3D-AD
  clouds, which preprocessing already pads to a square), then nearest resize with
  ``torch.nn.functional.interpolate`` semantics. The reference resizes non-square clouds without padding,
  which misaligns them with the padded RGB; see docs/differences.md.
* Ground truth: centred edge-replicate pad, nearest resize, binary.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from networks.normalization import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalization  # noqa: F401 - re-exported


def centred_offsets(height: int, width: int, side: int) -> tuple[int, int]:
    """(top, left) of an (height, width) image centred in a side × side square (odd remainders bottom/right)."""
    return (side - height) // 2, (side - width) // 2


def pad_centred(array: np.ndarray, side: int, mode: str = "constant") -> np.ndarray:
    """Centre ``array`` (H, W[, C]) in a ``side`` × ``side`` square.

    Args:
        mode: ``edge`` replicates the border rows/columns (images, masks); ``constant`` pads with zeros
            (point clouds: zero is "no measurement").
    """
    height, width = array.shape[:2]
    top, left = centred_offsets(height, width, side)
    pad = [(top, side - height - top), (left, side - width - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode=mode)


def pad_to_square(array: np.ndarray, mode: str = "edge") -> np.ndarray:
    """Centre ``array`` (H, W[, C]) in a square of side max(H, W), by default replicating its edges."""
    return pad_centred(array, max(array.shape[:2]), mode)


@functools.lru_cache(maxsize=32)
def image_area(height: int, width: int, size: int) -> torch.Tensor:
    """Which pixels of the (size, size) network input show the (height, width) image rather than the padding that
    :func:`pad_to_square` adds around a non-square one (nearest resize, like the clouds and masks). Cached: every
    batch of a 2D-only run asks for it, with the few sizes a dataset has; callers must not modify the result.

    Returns:
        (size, size) bool.
    """
    return resize_nearest(pad_to_square(np.ones((height, width), dtype=np.float32), mode="constant"), size)[0] > 0


def resize_nearest(array: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize with ``F.interpolate(mode="nearest")`` semantics.

    Args:
        array: (H, W) or (H, W, C) array.
        size: output side length.

    Returns:
        float32 tensor of shape (C, size, size) (C = 1 for a 2-D input).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor.unsqueeze(-1) if tensor.ndim == 2 else tensor
    tensor = tensor.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0]


def _mean_std(normalization: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(normalization.mean).view(3, 1, 1), torch.tensor(normalization.std).view(3, 1, 1)


def rgb_to_tensor(rgb: np.ndarray, size: int, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """Turn an (H, W, 3) uint8 image into the network input.

    Returns:
        float32 tensor of shape (3, size, size), normalised with the backbone's ``normalization``.
    """
    square = Image.fromarray(pad_to_square(rgb))
    resized = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(resized).permute(2, 0, 1)
    mean, std = _mean_std(normalization)
    return (tensor - mean) / std


def denormalize_rgb(tensor: torch.Tensor, normalization: Normalization = IMAGENET) -> np.ndarray:
    """Undo :func:`rgb_to_tensor`'s normalisation for display: (3, S, S) → (S, S, 3) uint8."""
    mean, std = _mean_std(normalization)
    image = (tensor.detach().cpu().float() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def xyz_to_tensor(xyz: np.ndarray, size: int) -> torch.Tensor:
    """Pad an organized point cloud (H, W, 3) with invalid pixels to a centred square and resize it (nearest).

    Returns:
        (3, size, size) tensor; invalid pixels stay (0, 0, 0).
    """
    return resize_nearest(pad_to_square(xyz, mode="constant"), size)


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Pad and resize a boolean (H, W) mask to a (1, size, size) float tensor of 0/1."""
    return resize_nearest(pad_to_square(mask.astype(np.float32)), size)


def to_native_resolution(score_map: np.ndarray | torch.Tensor, original_size: tuple[int, int]) -> np.ndarray:
    """Map an (S, S) score map back onto its image's native (H, W) pixel grid.

    Inverse of the square pad + resize of :func:`rgb_to_tensor` / :func:`mask_to_tensor`: bilinear
    upsampling to the padded square of side max(H, W), then the centred crop of the image. This is what the
    official MVTec evaluation expects (maps compared with the original gt at native resolution).

    Returns:
        float32 array of shape (H, W).
    """
    height, width = original_size
    side = max(height, width)
    tensor = torch.as_tensor(score_map, dtype=torch.float32).reshape(1, 1, *np.shape(score_map)[-2:])
    square = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    top, left = centred_offsets(height, width, side)
    return square[top : top + height, left : left + width].numpy()
