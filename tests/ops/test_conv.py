import pytest
import torch

from bmojo.ops.conv import causal_depthwise_conv1d, causal_depthwise_conv1d_reference


@pytest.mark.parametrize("length", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_conv_equals_reference_outputs_and_gradients(length, kernel, with_bias):
    g = torch.Generator().manual_seed(length * 10 + kernel)
    x = torch.randn(3, length, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 1, kernel, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if with_bias else None
    fast = causal_depthwise_conv1d(x, w, b)
    ref = causal_depthwise_conv1d_reference(x, w, b)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(ref)
    inputs = [x, w] + ([b] if with_bias else [])
    for gf, gr in zip(torch.autograd.grad(fast, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True):
        torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5)


def test_fast_conv_compiles_to_the_eager_outputs_and_gradients(assert_op_compiles_to_eager):
    """Under ``torch.compile`` the hand-written Function gives the eager output and gradients.
    PyTorch 2.11 compiled a Function whose forward modified its output in place to wrong gradients
    (pytorch/pytorch#180642): here the weight's were all zero and half the input's wrong."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    grad = torch.randn(2, 17, 6, generator=g)
    assert_op_compiles_to_eager(causal_depthwise_conv1d, (x, w, b), grad, output_tol=(0, 0))


def test_conv_is_causal_by_definition():
    x = torch.randn(1, 10, 2)
    w = torch.randn(2, 1, 4)
    y = causal_depthwise_conv1d(x, w, None)
    # y[t] = sum_k w[k] x[t-3+k], written out for t = 5
    expected = sum(w[:, 0, k] * x[0, 5 - 3 + k] for k in range(4))
    torch.testing.assert_close(y[0, 5], expected)
    x2 = x.clone()
    x2[:, 6:] = 0
    torch.testing.assert_close(causal_depthwise_conv1d(x2, w, None)[:, :6], y[:, :6])


def test_fast_conv_gradcheck_float64():
    """The hand-written backward against finite differences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(causal_depthwise_conv1d, (x, w, b))
