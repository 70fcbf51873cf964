"""Cross-modal feature mapping: a per-pixel MLP from one modality's features to the other's."""

from __future__ import annotations

import torch
from torch import nn

from networks.blocks.activation_checkpointing import CheckpointableMixin
from networks.blocks.dropout import Dropout


class FeatureMappingMLP(CheckpointableMixin, nn.Module):
    """Maps features of one modality to the other's, pixel by pixel.

    ``input`` Linear(in→r) → GELU → ``projection`` [Linear(r→r), GELU, LayerNorm, Dropout, Linear(r→r), GELU,
    LayerNorm] → ``output`` Linear(r→out), with r = (in + out) // 2. Parameter names equal the reference's.

    Args:
        in_features: input width (768 for M2D→3D at paper size).
        out_features: output width (1152 for M2D→3D).
        dropout: dropout inside ``projection``.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.input = nn.Linear(in_features, hidden)
        self.act_fcn = nn.GELU()
        self.projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
        )
        self.output = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, in_features) → (B, P, out_features); one checkpointed segment (see
        :mod:`networks.blocks.activation_checkpointing`)."""
        return self.segment(self._layers, x)

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.projection(self.act_fcn(self.input(x))))
