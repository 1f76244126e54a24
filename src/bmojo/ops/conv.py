"""Depthwise causal 1-D convolution of the Mamba-2 block (DESIGN.md §3.1).

``causal_depthwise_conv1d`` computes ``y[:, t, c] = bias[c] + Σ_k w[c, 0, k] · x[:, t-K+1+k, c]``
(zeros before the sequence start) as ``K`` shifted multiply-adds; its reference is PyTorch's
``conv1d`` with ``groups = channels`` and ``K-1`` left padding, whose CPU backward is slow
for the small kernels (``K = 4``) Mamba uses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def causal_depthwise_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [B, L, C]``, ``weight [C, 1, K]``, ``bias [C]`` -> ``[B, L, C]`` via ``F.conv1d``."""
    L, K = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=x.shape[-1])
    return y[..., :L].transpose(1, 2)


def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Fast path of :func:`causal_depthwise_conv1d_reference`, same arguments and result."""
    L, K = x.shape[1], weight.shape[-1]
    padded = F.pad(x, (0, 0, K - 1, 0))  # [B, L+K-1, C]
    taps = weight[:, 0, :].to(x.dtype)  # [C, K]
    y = padded[:, K - 1:] * taps[:, K - 1]
    for k in range(K - 1):
        y = y + padded[:, k: k + L] * taps[:, k]
    return y if bias is None else y + bias.to(x.dtype)
