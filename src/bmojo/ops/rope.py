"""Rotary position embedding (RoPE), half-split ("GPT-NeoX") layout, DESIGN.md §3.2."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``positions [l]`` (any integers, also negative) -> ``(cos, sin)`` each ``[l, head_dim]``
    in float32, laid out for :func:`apply_rope`: ``cos`` of each frequency in both halves, and
    ``sin`` negated in the first half (``-sin, sin``)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [l, head_dim/2]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., l, heads, head_dim]`` by the angles of its positions (``cos, sin [l,
    head_dim]`` from :func:`rope_angles`): each pair ``(x1, x2)`` of the two halves becomes
    ``(x1·cos - x2·sin, x2·cos + x1·sin)``, computed in float32 as ``x·cos + swap(x)·(-sin, sin)``
    (four ops; the same roundings), returned in ``x``'s dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    swapped = torch.cat([x2, x1], dim=-1)
    return (xf * cos[:, None, :] + swapped * sin[:, None, :]).to(x.dtype)
