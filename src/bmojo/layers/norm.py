"""RMSNorm and the gated RMSNorm of the Mamba-2 block (DESIGN.md §3.1, §6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bmojo.ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32 (:func:`bmojo.ops.norm.rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba-2's ``RMSNormGated(norm_before_gate=False)``: normalise ``y · silu(z)`` per group
    of ``dim / n_groups`` channels, then scale by ``weight [dim]`` (:func:`bmojo.ops.norm.gated_rms_norm`)."""

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % n_groups != 0:
            raise ValueError(f"dim {dim} must be a multiple of n_groups {n_groups}")
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.n_groups, self.eps)
