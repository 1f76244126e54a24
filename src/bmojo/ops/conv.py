"""Depthwise causal 1-D convolution of the Mamba-2 block (DESIGN.md §3.1).

``causal_depthwise_conv1d`` computes ``y[:, t, c] = bias[c] + Σ_k w[c, 0, k] · x[:, t-K+1+k, c]``
(zeros before the sequence start) as ``K`` shifted multiply-adds, and its backward likewise;
its reference is PyTorch's ``conv1d`` with ``groups = channels`` and ``K-1`` left padding,
whose CPU backward is slow for the small kernels (``K = 4``) Mamba uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bmojo.ops.layout import contiguous_cast


def causal_depthwise_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [B, L, C]``, ``weight [C, 1, K]``, ``bias [C]`` -> ``[B, L, C]`` via ``F.conv1d``."""
    L, K = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=x.shape[-1])
    return y[..., :L].transpose(1, 2)


class _CausalDepthwiseConv1d(torch.autograd.Function):
    """``y[:, t] = Σ_k taps[k] · x[:, t-K+1+k]`` with its backward written out, both as ``K``
    in-place shifted multiply-adds: autograd through the shifted slices would build a
    zero-filled gradient of the padded input per tap.

    ``taps`` is tap-major (``[K, C]``, contiguous) so each tap broadcast over the channels is a
    contiguous row: a column of the reference's ``[C, K]`` layout (stride ``K``) made every
    multiply-add 6-9x slower (docs/performance.md, "The convolution's taps, and the
    targets again").

    The forward's last multiply-add writes a new tensor rather than the sum in place: PyTorch
    2.11 compiles a Function whose forward modifies its output in place to wrong gradients
    (pytorch/pytorch#180642; tests/ops/test_conv.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor) -> Tensor:  # x [B, L, C], taps [K, C]
        L, K = x.shape[1], taps.shape[0]
        padded = F.pad(x, (0, 0, K - 1, 0))  # [B, L+K-1, C]
        partial = padded[:, K - 1:] * taps[K - 1]  # [B, L, C]
        for k in range(K - 2):
            partial.addcmul_(padded[:, k: k + L], taps[k])
        y = partial if K == 1 else torch.addcmul(partial, padded[:, K - 2: K - 2 + L], taps[K - 2])
        ctx.save_for_backward(padded, taps)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor]:
        padded, taps = ctx.saved_tensors
        L, K = grad_y.shape[1], taps.shape[0]
        # x[s] feeds y[s + K-1-k] through tap k: grad_x[s] = Σ_k taps[k] · grad_y[s + K-1-k].
        grad_padded = F.pad(grad_y, (0, 0, 0, K - 1))  # [B, L+K-1, C], zeros after the end
        grad_x = grad_padded[:, :L] * taps[K - 1]
        for k in range(K - 1):
            grad_x.addcmul_(grad_padded[:, K - 1 - k: K - 1 - k + L], taps[k])
        grad_taps = torch.stack([(grad_y * padded[:, k: k + L]).sum((0, 1)) for k in range(K)])  # [K, C]
        return grad_x, grad_taps


def causal_depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Fast path of :func:`causal_depthwise_conv1d_reference`, same arguments and result."""
    y = _CausalDepthwiseConv1d.apply(x, contiguous_cast(weight[:, 0, :].t(), x.dtype))  # taps [K, C], x [B, L, C]
    return y if bias is None else y + bias.to(x.dtype)
