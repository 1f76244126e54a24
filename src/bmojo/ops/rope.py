"""Rotary position embedding (RoPE), half-split ("GPT-NeoX") layout, DESIGN.md §3.2."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``positions [l]`` (any integers, also negative) -> ``(cos, sin)`` each ``[l, head_dim/2]``
    in float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., l, heads, head_dim]`` by the angles of its positions
    (``cos, sin [l, head_dim/2]``). Computed in float32, returned in ``x``'s dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)
