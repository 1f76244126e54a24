"""The norms' fast paths against their references (DESIGN.md §3.1, §6): the same outputs bit for
bit, the same gradients, and less kept for the backward."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.norm import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference


def _leaf(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_()


def _outputs_and_grads(fn, inputs, d_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor)], d_out)
    return out, grads


def _assert_same(fast, reference, inputs, d_out, atol, rtol):
    out, grads = _outputs_and_grads(fast, inputs, d_out)
    ref_out, ref_grads = _outputs_and_grads(reference, inputs, d_out)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # same forward arithmetic
    assert out.dtype == ref_out.dtype
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == ref_grad.dtype
        torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)


# Both compute in float32 whatever the input dtype: gradients agree to float32 rounding, and bf16
# inputs get bf16 gradients, each rounded once from float32.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float64: (1e-5, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 7, 48), (5, 1), (3, 4, 2, 16)])
def test_rms_norm_matches_reference(dtype, shape):
    x = _leaf(*shape, seed=1, dtype=dtype, scale=3.0)
    weight = _leaf(shape[-1], seed=2)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    _assert_same(lambda a, w: rms_norm(a, w, 1e-5), lambda a, w: rms_norm_reference(a, w, 1e-5),
                 (x, weight), d_out, *TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("shape", "n_groups"), [((2, 7, 48), 1), ((2, 7, 48), 4), ((3, 10), 2), ((1, 2, 3, 8), 8)])
def test_gated_rms_norm_matches_reference(dtype, shape, n_groups):
    y = _leaf(*shape, seed=4, dtype=dtype, scale=2.0)
    z = _leaf(*shape, seed=5, dtype=dtype, scale=4.0)  # silu's both tails
    weight = _leaf(shape[-1], seed=6)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    _assert_same(lambda a, b, w: gated_rms_norm(a, b, w, n_groups, 1e-5),
                 lambda a, b, w: gated_rms_norm_reference(a, b, w, n_groups, 1e-5),
                 (y, z, weight), d_out, *TOLERANCES[dtype])


def test_gradients_match_a_float64_formula():
    """Against autograd through the formulas in float64 (independent of both paths' float32)."""
    y, z = _leaf(3, 12, seed=9), _leaf(3, 12, seed=10, scale=3.0)
    weight = _leaf(12, seed=11)
    d_out = torch.randn(3, 12, generator=torch.Generator().manual_seed(12))

    def rms64(a, w):
        a, w = a.double(), w.double()
        return a / (a.pow(2).mean(-1, keepdim=True) + 1e-2).sqrt() * w

    def gated64(a, b, w):
        g = (a.double() * b.double() * torch.sigmoid(b.double())).unflatten(-1, (3, 4))
        return (g / (g.pow(2).mean(-1, keepdim=True) + 1e-2).sqrt()).flatten(-2) * w.double()

    for fast, formula, inputs in ((lambda a, w: rms_norm(a, w, 1e-2), rms64, (y, weight)),
                                  (lambda a, b, w: gated_rms_norm(a, b, w, 3, 1e-2), gated64, (y, z, weight))):
        _, grads = _outputs_and_grads(fast, inputs, d_out)
        _, expected = _outputs_and_grads(formula, inputs, d_out.double())
        for grad, ref in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad.double(), ref.double(), atol=1e-5, rtol=1e-5)


def test_gated_rms_norm_rejects_groups_that_do_not_divide():
    y = torch.randn(2, 10)
    with pytest.raises(ValueError, match="multiple of n_groups 3"):
        gated_rms_norm(y, y, torch.ones(10), 3, 1e-5)


def test_fast_paths_keep_only_the_inverse_rms(saved_for_backward):
    """The point of the fast paths: no float32 activation of the norm's size is kept (the
    references keep two or more), only one float32 per row and group."""
    x, z = (torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    weight = torch.ones(256, requires_grad=True)

    def saved_bytes(fn, *inputs) -> int:
        return sum(t.untyped_storage().nbytes() for t in saved_for_backward(fn, *inputs))

    per_row, activation = 64 * 4, 64 * 256 * 4  # one float32 per row; a float32 tensor of the norm's size
    assert saved_bytes(lambda a, w: rms_norm(a, w, 1e-5), x, weight) == per_row
    assert saved_bytes(lambda a, w: rms_norm_reference(a, w, 1e-5), x, weight) >= 2 * activation
    assert saved_bytes(lambda a, b, w: gated_rms_norm(a, b, w, 4, 1e-5), x, z, weight) == 4 * per_row
    assert saved_bytes(lambda a, b, w: gated_rms_norm_reference(a, b, w, 4, 1e-5), x, z, weight) >= 3 * activation


def test_norms_compile_to_the_eager_outputs_and_gradients(assert_op_compiles_to_eager):
    """Under ``torch.compile`` the written-out backwards give the eager gradients."""
    x = _leaf(4, 6, 32, seed=12)
    z = _leaf(4, 6, 32, seed=13)
    weight = _leaf(32, seed=14)

    def both(a, b, w):
        return rms_norm(a, w, 1e-5) * gated_rms_norm(a, b, w, 2, 1e-5)

    d_out = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(15))
    assert_op_compiles_to_eager(both, (x, z, weight), d_out)


def test_the_functions_run_only_where_a_gradient_is_recorded():
    """Inference (no grad mode, or no input requiring one) runs the references' ops directly:
    the same result, without a Function's bookkeeping."""
    y, z = _leaf(3, 16, seed=16), _leaf(3, 16, seed=17)
    weight = _leaf(16, seed=18)
    assert type(rms_norm(y, weight, 1e-5).grad_fn).__name__ == "_RMSNormBackward"
    assert type(gated_rms_norm(y, z, weight, 2, 1e-5).grad_fn).__name__ == "_GatedRMSNormBackward"
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(y, weight, 1e-5), rms_norm_reference(y, weight, 1e-5), atol=0, rtol=0)
        torch.testing.assert_close(gated_rms_norm(y, z, weight, 2, 1e-5),
                                   gated_rms_norm_reference(y, z, weight, 2, 1e-5), atol=0, rtol=0)
    frozen = [t.detach() for t in (y, z, weight)]
    assert rms_norm(frozen[0], frozen[2], 1e-5).grad_fn is None
    assert gated_rms_norm(*frozen[:2], frozen[2], 2, 1e-5).grad_fn is None
