"""RMSNorm and the gated RMSNorm of the Mamba-2 block (DESIGN.md §3.1, §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's ``RMSNormGated(norm_before_gate=False)``: normalise ``y · silu(z)`` per group
    of ``dim / n_groups`` channels, then scale by ``weight [dim]``."""

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % n_groups != 0:
            raise ValueError(f"dim {dim} must be a multiple of n_groups {n_groups}")
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        gated = y.float() * F.silu(z.float())  # [..., dim]
        grouped = gated.unflatten(-1, (self.n_groups, -1))  # [..., g, dim/g]
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(y.dtype)
