"""Activation checkpointing of the trainable modules: keep a segment's input, recompute its inside in backward.

At paper size (224² = 50176 pixels) the activations of one training step dominate memory: the mapping MLPs keep
≈10 activations of width 960 per pixel and Decoder2D's attention and heads as many again. A checkpointed segment
stores only its input during the forward pass and recomputes the rest during backward — about one more forward
pass of compute, the same values bit for bit (the recomputation replays the segment's dropout masks from the
saved random state). Segments holding BatchNorm are never checkpointed: recomputing them would update the
running statistics twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointableMixin:
    """A module whose :meth:`segment` calls are checkpointed when ``activation_checkpointing`` is set and it trains
    with gradients (never in inference)."""

    activation_checkpointing: bool = False

    def segment(self, function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, x, use_reentrant=False)
        return function(x)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch checkpointing on or off in every checkpointable submodule of ``model``; returns how many there are."""
    modules = [m for m in model.modules() if isinstance(m, CheckpointableMixin)]
    for module in modules:
        module.activation_checkpointing = enabled
    return len(modules)
