"""Dual-branch reconstruction (docs/training.md): Decoder2D for RGB features, Decoder3D for 3D features.

Parameter names equal the reference's, so its checkpoints load with ``strict=True``. Sizes are constructor
arguments: the paper configuration is the default; the tiny preset and the 96×96 scan layout use the same classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.blocks.activation_checkpointing import CheckpointableMixin
from networks.blocks.dropout import Dropout


class WindowAttention(nn.Module):
    """Multi-head self-attention inside consecutive 1-D windows of tokens (raster order)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, D); the sequence is zero-padded to a multiple of the window and cropped back."""
        batch, tokens, dim = x.shape
        pad = (-tokens) % self.window_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        windows = x.reshape(-1, self.window_size, dim)  # (B·nW, w, D)
        n, w, _ = windows.shape
        qkv = self.qkv(windows).reshape(n, w, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(n, w, dim)))
        return out.reshape(batch, tokens + pad, dim)[:, :tokens]


class WindowBlock(nn.Module):
    """Pre-norm transformer block with windowed attention: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, window_size: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), Dropout(dropout), nn.Linear(2 * dim, dim), Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Decoder2D(CheckpointableMixin, nn.Module):
    """Reconstructs RGB features: projection, one windowed-attention block, a transposed-conv stack, an MLP head.

    Args:
        dim: feature width (768 at paper size); the decoder works at dim // 2.
        img_size: side of the feature map (224).
        num_heads: attention heads (8).
        window_size: tokens per attention window (128).
        conv_channels: the two hidden widths of ``conv_decoder`` (256, 128 at paper size).
        dropout: every dropout of the module (0.1).
    """

    def __init__(self, dim: int = 768, img_size: int = 224, num_heads: int = 8, window_size: int = 128,
                 conv_channels: tuple[int, int] = (256, 128), dropout: float = 0.1) -> None:
        super().__init__()
        reduced = dim // 2
        self.img_size = img_size
        self.projection = nn.Sequential(
            nn.Linear(dim, reduced), nn.GELU(), nn.LayerNorm(reduced), Dropout(dropout),
            nn.Linear(reduced, reduced), nn.GELU(), nn.LayerNorm(reduced),
        )
        self.attn = WindowBlock(reduced, num_heads, window_size, dropout)
        c1, c2 = conv_channels
        layers: list[nn.Module] = []
        for c_in, c_out in ((reduced, c1), (c1, c2), (c2, reduced)):
            layers += [nn.ConvTranspose2d(c_in, c_out, 3, stride=1, padding=1), nn.BatchNorm2d(c_out), nn.GELU()]
        self.conv_decoder = nn.Sequential(*layers)
        self.reconstruct = nn.Sequential(
            nn.Linear(reduced, 4 * reduced), nn.GELU(), Dropout(dropout), nn.Linear(4 * reduced, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, dim) → (B, P, dim), P = img_size². Checkpointed segments: the projection with the attention
        block, and the head; the BatchNorm stack between them is not."""
        batch = x.shape[0]
        x = self.segment(lambda x: self.attn(self.projection(x)), x)
        x = x.transpose(1, 2).reshape(batch, -1, self.img_size, self.img_size)
        x = self.conv_decoder(x).flatten(2).transpose(1, 2)
        return self.segment(self.reconstruct, x)


class Decoder3D(nn.Module):
    """Reconstructs 3D features: a projection along the pixel axis, five transposed 1-D convs, channel attention.

    Args:
        out_seq_len: number of pixels L (50176 = 224² at paper size; 9216 for the 96×96 scan layout);
            divisible by 32.
        feature_dim: feature width (1152).
        channels: hidden widths of the four intermediate convs (768, 512, 256, 128 at paper size).
        se_reduction: squeeze-excitation reduction (1152 → 144).
        dropout: dropout inside ``projection``.
    """

    def __init__(self, out_seq_len: int = 50176, feature_dim: int = 1152,
                 channels: tuple[int, int, int, int] = (768, 512, 256, 128), se_reduction: int = 8,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if out_seq_len % 32:
            raise ValueError(f"out_seq_len must be divisible by 32, got {out_seq_len}")
        reduced = out_seq_len // 32
        self.projection = nn.Sequential(
            nn.Linear(out_seq_len, reduced), nn.GELU(), nn.LayerNorm(reduced), Dropout(dropout),
            nn.Linear(reduced, reduced), nn.GELU(), nn.LayerNorm(reduced),
        )
        widths = (feature_dim, *channels, feature_dim)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose1d(c_in, c_out, 4, stride=2, padding=1))  # doubles the length
            layers += [nn.BatchNorm1d(c_out), nn.GELU()] if i < len(channels) else [nn.Tanh()]
        self.decoder = nn.Sequential(*layers)
        hidden = feature_dim // se_reduction
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool1d(1), nn.Conv1d(feature_dim, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, feature_dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, feature_dim) → (B, L, feature_dim)."""
        x = self.decoder(self.projection(x.transpose(1, 2)))
        return (x * self.attention(x)).transpose(1, 2)  # multiplicative channel attention, no residual
