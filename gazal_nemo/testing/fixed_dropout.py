"""Dropout with a known mask, so PEFT and our adapter can be compared with dropout on."""

import torch


class FixedMask(torch.nn.Module):
    """Multiplies by a fixed mask (already scaled by 1/(1-p), like nn.Dropout's output)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask
