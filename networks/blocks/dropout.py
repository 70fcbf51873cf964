"""Dropout whose mask costs a quarter of the random numbers on a CPU.

``nn.Dropout`` draws one Bernoulli number per element from the CPU generator (Mersenne Twister, one thread): in
lite CMDR-IAD's training step that was a fifth of the time (docs/performance.md, "Training"). :class:`Dropout`
draws 64 random bits per four elements and keeps an element when its 16 bits are at or above
``round(p · 2¹⁶)``: the drop probability is p to within 2⁻¹⁷ (0.1 → 0.1000061), the kept elements are scaled by
1 / (1 − p) as ``nn.Dropout`` does. On other devices (CUDA's generator is fast) and in evaluation it is
``nn.Dropout`` itself. The modules keep the class name in their printout and have no parameters, so checkpoints
and the reference's key names are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_BITS = 16
_WORDS_PER_DRAW = 64 // MASK_BITS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of ``shape``, each element False with probability ``round(p · 2¹⁶) / 2¹⁶``, drawn from the
    global generator of ``device``: 64-bit draws over the whole int64 range, read as four int16 each."""
    count = 1
    for side in shape:
        count *= side
    words = -(-count // _WORDS_PER_DRAW)
    bits = torch.empty(words, dtype=torch.int64, device=device).random_(torch.iinfo(torch.int64).min, None)
    threshold = round(p * (1 << MASK_BITS)) + torch.iinfo(torch.int16).min  # P(int16 < threshold) = p
    return (bits.view(torch.int16)[:count] >= threshold).view(shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (not in place) with :func:`keep_mask`'s masks when training on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p == 1 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        # a float mask times x: the multiplication's backward is as cheap as its forward (torch.where's is not)
        return x * keep_mask(x.shape, self.p, x.device).to(x.dtype).mul_(1.0 / (1.0 - self.p))
