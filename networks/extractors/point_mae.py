"""The Point-MAE encoder used as the frozen 3D feature extractor (docs/features.md, "Frozen feature extractors").

Parameter names equal the reference encoder's (``reference_state_dicts.json``, key ``PointMAE_encoder``), so
the public Point-MAE checkpoint loads unchanged through :func:`convert_pointmae_checkpoint`.

The encoder processes one sample at a time: its BatchNorm layers in ``bn_mode="sample"`` normalise with the
statistics of the sample being encoded (all its groups and points), which is what the reference computes
because it never switches the extractor to eval mode. Drop-path is never applied (the extractor is frozen).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from networks.errors import InputError
from networks.extractors.point_ops import farthest_point_sample, knn_groups

logger = logging.getLogger(__name__)

BNMode = Literal["sample", "running"]
POINTMAE_URL = "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth"
DEFAULT_POINTMAE_WEIGHTS = Path("checkpoints/feature_extractors/pointmae_pretrain.pth")
# Keys of the pre-training checkpoint that belong to the MAE decoder, not to the encoder.
_DECODER_PREFIXES = ("MAE_decoder.", "decoder_pos_embed.", "mask_token", "increase_dim.")


class WeightsError(InputError, RuntimeError):
    """Pretrained weights are missing or do not fit the model."""


@dataclass(frozen=True)
class PointMAEConfig:
    """Sizes of the Point-MAE encoder (defaults: the public checkpoint).

    Attributes:
        trans_dim: transformer width (= token width).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: hidden width of the block MLPs over ``trans_dim``.
        num_group: number of FPS centres (groups) per cloud.
        group_size: points per group (kNN of each centre).
        first_conv: channels of the mini-PointNet's first conv pair.
        second_conv_hidden: hidden channels of its second conv pair.
        fetch_blocks: blocks whose (normalised) outputs are concatenated into the feature.
    """

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_group: int = 1024
    group_size: int = 128
    first_conv: tuple[int, int] = (128, 256)
    second_conv_hidden: int = 512
    fetch_blocks: tuple[int, ...] = (3, 7, 11)

    @property
    def feature_dim(self) -> int:
        """Width of the per-group feature (1152 for the paper)."""
        return self.trans_dim * len(self.fetch_blocks)


def _batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, mode: BNMode) -> torch.Tensor:
    """BatchNorm with the statistics of ``x`` itself (``sample``) or the stored ones (``running``)."""
    if mode == "sample":  # running statistics are neither used nor updated
        return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


class MiniPointNet(nn.Module):
    """Token encoder: one feature vector per point group (named ``encoder`` in the state dict)."""

    def __init__(self, out_channels: int, first_conv: tuple[int, int], second_hidden: int) -> None:
        super().__init__()
        c1, c2 = first_conv
        self.first_conv = nn.Sequential(nn.Conv1d(3, c1, 1), nn.BatchNorm1d(c1), nn.ReLU(), nn.Conv1d(c1, c2, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * c2, second_hidden, 1), nn.BatchNorm1d(second_hidden), nn.ReLU(),
            nn.Conv1d(second_hidden, out_channels, 1),
        )
        self.bn_mode: BNMode = "sample"

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(G, k, 3) centred point groups of one sample → (G, out_channels) tokens.

        The reference's 1×1 Conv1d layers on (G, C, k) are per-group matrix products; they run here as one
        batched product each (1.6× faster than the convolutions at paper size), and the layer after the
        concatenation [global feature, point feature] is split: its global half is computed once per group instead
        of once per point. The layout stays (G, C, k) so that BatchNorm sums each channel in one thread: the tokens
        do not depend on the thread count. Equal to the reference up to float32 summation order. The ReLUs run in
        place and the last layer a slice of groups at a time, so no fresh 200 MB tensor is touched for them
        (page faults): tokens 1.11–1.15 → 0.96–0.99 s at paper size, the same bits.
        """
        conv1, bn1, _, conv2 = self.first_conv
        conv3, bn2, _, conv4 = self.second_conv
        x = _batch_norm(bn1, _pointwise(conv1, groups.transpose(1, 2)), self.bn_mode).relu_()
        feature = _pointwise(conv2, x)  # (G, c2, k)
        global_feature = feature.max(dim=2, keepdim=True).values  # (G, c2, 1)
        c2 = feature.shape[1]
        weight = conv3.weight[..., 0]  # (hidden, 2·c2): the global feature comes first in the concatenation
        per_group = torch.matmul(weight[:, :c2], global_feature) + conv3.bias[:, None]  # (G, hidden, 1)
        hidden = torch.baddbmm(per_group.expand(-1, -1, feature.shape[2]),
                               weight[:, c2:].expand(len(feature), -1, -1), feature)
        hidden = _batch_norm(bn2, hidden, self.bn_mode).relu_()  # in place: no second fresh (G, 512, k) tensor
        # the last layer and its max over the points, a slice of groups at a time: its (G, out, k) output never
        # exists whole (201 MB at paper size, fresh memory each time)
        return torch.cat([_pointwise(conv4, part).amax(dim=2) for part in hidden.split(_GROUPS_PER_SLICE)])


# Groups per slice of the token encoder's last layer (64 × 384 × 128 float32 = 12.6 MB at paper size).
_GROUPS_PER_SLICE = 64


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 Conv1d as one batched matrix product: (G, C_in, k) → (G, C_out, k)."""
    groups, _, points = x.shape
    return torch.baddbmm(conv.bias[None, :, None].expand(groups, -1, points),
                         conv.weight[..., 0].expand(groups, -1, -1), x)


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free qkv, computed as softmax((q·scale)·kᵀ)·v."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, D)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Holds the blocks (state-dict prefix ``blocks.blocks.``); the forward lives in the encoder."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))


def _init_weights(module: nn.Module) -> None:
    """Point-MAE's own initialisation (truncated normal, std 0.02; zero biases), used when no weights are loaded."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PointMAEEncoder(nn.Module):
    """Point-MAE encoder: FPS + kNN grouping, mini-PointNet tokens, a transformer, multi-layer features.

    Args:
        config: sizes; defaults are the public checkpoint's.
        bn_mode: ``sample`` (per-sample BatchNorm statistics, the reference's behaviour, default) or
            ``running`` (the checkpoint's running statistics).
    """

    def __init__(self, config: PointMAEConfig = PointMAEConfig(), bn_mode: BNMode = "sample") -> None:
        super().__init__()
        if bn_mode not in ("sample", "running"):
            raise ValueError(f"bn_mode must be 'sample' or 'running', got {bn_mode!r}")
        if max(config.fetch_blocks) >= config.depth:
            raise ValueError(f"fetch_blocks {config.fetch_blocks} outside a depth of {config.depth}")
        self.config = config
        self.encoder = MiniPointNet(config.trans_dim, config.first_conv, config.second_conv_hidden)
        self.encoder.bn_mode = bn_mode
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, config.trans_dim))
        self.blocks = TransformerEncoder(config.trans_dim, config.depth, config.num_heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(config.trans_dim)
        self.apply(_init_weights)

    @property
    def bn_mode(self) -> BNMode:
        return self.encoder.bn_mode

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split one cloud into groups.

        Args:
            points: (N, 3) valid points of one sample, N >= max(num_group, group_size).

        Returns:
            (neighbourhoods (G, k, 3) relative to their centre, centres (G, 3)).
        """
        n_points = points.shape[0]
        needed = max(self.config.num_group, self.config.group_size)
        if n_points < needed:
            raise ValueError(
                f"point cloud has {n_points} valid points, fewer than the {needed} that num_group="
                f"{self.config.num_group} / group_size={self.config.group_size} need"
            )
        centres = points[farthest_point_sample(points, self.config.num_group)]
        neighbourhoods = points[knn_groups(points, centres, self.config.group_size)] - centres[:, None]
        return neighbourhoods, centres

    def forward(self, neighbourhoods: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Features of one sample's groups.

        Args:
            neighbourhoods: (G, k, 3) centred groups.
            centres: (G, 3) group centres.

        Returns:
            (G, feature_dim): the normalised outputs of ``fetch_blocks`` concatenated along channels.
        """
        x = self.encoder(neighbourhoods)[None]  # (1, G, D)
        pos = self.pos_embed(centres)[None]
        fetched = []
        for i, block in enumerate(self.blocks.blocks):
            x = block(x + pos)  # the positional embedding is added again before every block
            if i in self.config.fetch_blocks:
                fetched.append(self.norm(x))
        return torch.cat(fetched, dim=-1)[0]


def convert_pointmae_checkpoint(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Encoder state dict from a Point-MAE pre-training checkpoint.

    Takes ``checkpoint["base_model"]`` (or the mapping itself), strips a leading ``module.`` and then
    ``MAE_encoder.``, and drops the decoder's keys.
    """
    state = checkpoint.get("base_model", checkpoint)
    if not isinstance(state, Mapping):
        raise WeightsError("checkpoint has no 'base_model' state dict")
    converted = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_DECODER_PREFIXES):
            continue
        converted[key.removeprefix("MAE_encoder.")] = value
    return converted


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing, unexpected or misshaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", sorted(misshaped)))
            if keys
        ]
        raise WeightsError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


TRUST_PICKLE_ENV = "CMDR_TRUST_PICKLED_CHECKPOINTS"


def read_checkpoint(path: str | Path, trust_pickle: bool | None = None) -> Mapping[str, object]:
    """Load a weights file on the CPU with ``weights_only=True`` (tensors and plain containers only).

    A file that also holds other pickled Python objects runs code from the file when loaded; that is done only
    when the user opts in (``trust_pickle=True``, or the environment variable ``CMDR_TRUST_PICKLED_CHECKPOINTS=1``
    when ``trust_pickle`` is None), as timm does.

    Raises:
        FileNotFoundError: no such file. WeightsError: unreadable, or pickled objects without the opt-in.
    """
    path = Path(path)
    if trust_pickle is None:
        trust_pickle = os.environ.get(TRUST_PICKLE_ENV, "") == "1"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        if not trust_pickle:
            raise WeightsError(
                f"{path}: not loadable with weights_only=True ({type(err).__name__}: {str(err).splitlines()[0]}). "
                f"It holds pickled Python objects besides tensors, and loading those runs code from the file. If "
                f"you trust the file, set {TRUST_PICKLE_ENV}=1 to load it anyway."
            ) from None
    logger.warning("%s: loading it as a full pickle (%s=1)", path, TRUST_PICKLE_ENV)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise WeightsError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None


def read_state_dict(path: str | Path, nested: tuple[str, ...] = ("state_dict", "model"),
                    hint: str = "") -> Mapping[str, object]:
    """A state dict from a ``.pth``/``.pt`` (:func:`read_checkpoint`; the first of the ``nested`` keys that holds
    a dict is taken, as training checkpoints nest their weights) or a ``.safetensors`` file.

    Raises:
        WeightsError: no such file (the message ends with ``hint``), or an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights not found at {path}{hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = read_checkpoint(path)
    for key in nested:
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_pointmae_weights(model: PointMAEEncoder, path: str | Path) -> None:
    """Load the public Point-MAE pre-training checkpoint (or a compatible one) into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"Point-MAE weights not found at {path}. Download {POINTMAE_URL} to {DEFAULT_POINTMAE_WEIGHTS} "
            "(or pass --pointmae_weights FILE); use --random_init only for smoke tests."
        )
    load_state_dict_checked(model, convert_pointmae_checkpoint(read_checkpoint(path)), path)
