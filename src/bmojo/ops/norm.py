"""RMSNorm and the Mamba-2 block's gated RMSNorm (DESIGN.md §3.1, §6), each a reference and a
fast path with the same arguments and result.

Both compute in float32 and return the input's dtype. The references are plain autograd
through the formula, which keeps every float32 intermediate of the norm for the backward
(the float32 input, the normalised rows, the gate): about four activations of the norm's
size in float32. The fast paths are ``autograd.Function`` s that keep only their inputs (in
their own dtype) and the per-row inverse RMS, and recompute the rest in the backward; same
forward arithmetic, so the same outputs, bit for bit. Tested equal, outputs and gradients
(tests/ops/test_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from bmojo.ops.grad import records_graph


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / rms(x) * weight`` over the last dim, in float32. ``x [..., D]``, ``weight [D]``."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def gated_rms_norm_reference(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    """Mamba-2's ``RMSNormGated(norm_before_gate=False)``: ``g = y · silu(z)`` normalised per
    group of ``D / n_groups`` channels, then scaled by ``weight``. ``y, z [..., D]``."""
    gated = y.float() * F.silu(z.float())  # [..., D]
    grouped = gated.unflatten(-1, (n_groups, -1))  # [..., g, D/g]
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * weight.float()).to(y.dtype)


def _normalized_backward(d_out: Tensor, normed: Tensor, rstd: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The RMSNorm backward in float32 over the last dim: ``d_out, normed [..., n]`` (the
    upstream gradient and ``x · rstd``), ``rstd [..., 1]``, ``weight`` broadcastable to ``normed``
    -> ``(d_x [..., n], d_out · normed)`` (the second summed over rows is the weight's gradient).

    ``out = x · rstd · w`` with ``rstd = (mean(x²) + eps)^-1/2`` gives
    ``d_x = rstd · (d_n - normed · mean(d_n · normed))`` where ``d_n = d_out · w``."""
    d_normed = d_out * weight
    dot = (d_normed * normed).mean(-1, keepdim=True)  # [..., 1]
    return d_normed.addcmul_(normed, dot, value=-1).mul_(rstd), d_out * normed


def _weight_grad(per_element: Tensor, weight: Tensor) -> Tensor:
    """Sum ``[..., D]`` over every leading dim -> ``weight``'s shape and dtype."""
    return per_element.reshape(-1, per_element.shape[-1]).sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm_reference` keeping ``x`` and the inverse RMS ``[..., 1]`` (float32) for
    the backward instead of the float32 input and normalised rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.float()).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        d_x, d_weight = _normalized_backward(d_out.float(), x.float() * rstd, rstd, weight.float())
        return d_x.to(x.dtype), _weight_grad(d_weight, weight), None


class _GatedRMSNorm(torch.autograd.Function):
    """:func:`gated_rms_norm_reference` keeping ``y, z`` and the inverse RMS per group
    ``[..., g, 1]`` (float32) for the backward; the gate and the normalised rows are recomputed."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
        grouped = (y.float() * F.silu(z.float())).unflatten(-1, (n_groups, -1))  # [..., g, D/g]
        rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)  # [..., g, 1]
        ctx.save_for_backward(y, z, weight, rstd)
        return ((grouped * rstd).flatten(-2) * weight.float()).to(y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):
        y, z, weight, rstd = ctx.saved_tensors
        yf, zf = y.float(), z.float()  # y, z themselves when float32: not written in place below
        sigmoid = torch.sigmoid(zf)
        gate = zf * sigmoid  # silu(z)
        n_groups = rstd.shape[-2]
        normed = (yf * gate).unflatten(-1, (n_groups, -1)).mul_(rstd)  # [..., g, D/g]
        d_gated, d_weight = _normalized_backward(d_out.float().unflatten(-1, (n_groups, -1)), normed, rstd,
                                                 weight.float().unflatten(-1, (n_groups, -1)))
        d_gated = d_gated.flatten(-2)  # [..., D]
        d_y = d_gated * gate
        silu_slope = (zf - gate).add_(1).mul_(sigmoid)  # silu'(z) = σ(z)(1 + z(1 - σ(z))) = σ(z)(1 + z - silu(z))
        d_z = d_gated.mul_(yf).mul_(silu_slope)
        return d_y.to(y.dtype), d_z.to(z.dtype), _weight_grad(d_weight.flatten(-2), weight), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fast path of :func:`rms_norm_reference` (same arguments and result; the reference's ops
    when no gradient is recorded)."""
    if not records_graph(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, n_groups: int, eps: float) -> Tensor:
    """Fast path of :func:`gated_rms_norm_reference` (same arguments and result; the reference's
    ops when no gradient is recorded)."""
    if y.shape[-1] % n_groups != 0:
        raise ValueError(f"the last dim {y.shape[-1]} must be a multiple of n_groups {n_groups}")
    if not records_graph(y, z, weight):
        return gated_rms_norm_reference(y, z, weight, n_groups, eps)
    return _GatedRMSNorm.apply(y, z, weight, n_groups, eps)
