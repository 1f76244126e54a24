"""The SwiGLU gate's fast path against its reference (DESIGN.md §6): the same outputs and
gradients bit for bit, and less kept for the backward."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.activation import swiglu, swiglu_reference


def _leaves(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 40), (7,), (1, 3, 4, 5)])
def test_swiglu_matches_reference_bit_for_bit(dtype, shape):
    gate, up = _leaves(shape, dtype, seed=1)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for fn in (swiglu, swiglu_reference):
        out = fn(gate, up)
        results.append((out, *torch.autograd.grad(out, (gate, up), d_out)))
    for fast, ref in zip(*results, strict=True):
        assert fast.dtype == ref.dtype == dtype
        torch.testing.assert_close(fast, ref, atol=0, rtol=0)


def test_swiglu_gradients_match_a_float64_formula():
    gate, up = _leaves((4, 16), torch.float64, seed=3)
    d_out = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    d_gate, d_up = torch.autograd.grad(swiglu(gate, up), (gate, up), d_out)
    sig = torch.sigmoid(gate.detach())
    torch.testing.assert_close(d_up, d_out * gate.detach() * sig)
    torch.testing.assert_close(d_gate, d_out * up.detach() * sig * (1 + gate.detach() * (1 - sig)))


def test_swiglu_keeps_only_its_inputs(saved_for_backward):
    gate, up = _leaves((8, 32), torch.bfloat16, seed=5)
    assert saved_for_backward(swiglu, gate, up) == []  # nothing besides gate and up themselves
    assert len(saved_for_backward(swiglu_reference, gate, up)) == 1  # silu(gate)


def test_swiglu_compiles_to_the_eager_outputs_and_gradients(assert_op_compiles_to_eager):
    gate, up = _leaves((3, 5, 8), torch.float32, seed=6)
    d_out = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(8))
    assert_op_compiles_to_eager(swiglu, (gate, up), d_out)


def test_swiglu_runs_its_function_only_where_a_gradient_is_recorded():
    gate, up = _leaves((2, 8), torch.float32, seed=7)
    assert type(swiglu(gate, up).grad_fn).__name__ == "_SwiGLUBackward"
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), atol=0, rtol=0)
    assert swiglu(gate.detach(), up.detach()).grad_fn is None
