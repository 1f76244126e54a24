"""SwiGLU feed-forward block (DESIGN.md §6)."""

from __future__ import annotations

from torch import Tensor, nn

from bmojo.ops.activation import swiglu


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (:func:`bmojo.ops.activation.swiglu`), no biases.
    ``[..., d_model] -> [..., d_model]``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
