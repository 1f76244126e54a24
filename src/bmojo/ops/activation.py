"""The SwiGLU gate ``silu(gate) · up`` of the MLP (DESIGN.md §6): a reference and a fast path
with the same arguments and result.

Autograd through the reference keeps ``gate``, ``silu(gate)`` and ``up`` for the backward,
three activations of the MLP's hidden width per layer. The fast path keeps ``gate`` and ``up``
and recomputes ``silu(gate)`` in the backward, which otherwise runs the same ops as autograd
(``silu_backward``, two products): outputs and gradients equal the reference's bit for bit
(tests/ops/test_activation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from bmojo.ops.grad import records_graph


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) · up``, elementwise. ``gate, up [..., hidden]``."""
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """:func:`swiglu_reference` keeping only ``gate`` and ``up`` for the backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor):
        gate, up = ctx.saved_tensors
        d_up = d_out * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(d_out * up, gate)
        return d_gate.to(gate.dtype), d_up.to(up.dtype)  # each input's dtype, should they differ


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fast path of :func:`swiglu_reference` (same arguments and result; the reference's ops when
    no gradient is recorded)."""
    if not records_graph(gate, up):
        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate, up)
