"""What every encoder returns, and the frozen-module behaviour they share."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    """Encoder output: one row of tokens per input.

    Attributes:
        values: ``(B, N, D)`` token features.
        mask: ``(B, N)`` True where a token is real (False for padding).
    """

    values: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> "Features":
        return Features(self.values.to(device), self.mask.to(device))


class FrozenMixin(nn.Module):
    """An ``nn.Module`` that can be frozen: no gradients and eval mode kept through ``train()``."""

    frozen: bool = False

    def freeze(self) -> "FrozenMixin":
        """Stop gradients and keep eval mode (dropout off, norms fixed) even when a parent trains."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def unfreeze(self) -> "FrozenMixin":
        self.frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> "FrozenMixin":
        return super().train(False if self.frozen else mode)
