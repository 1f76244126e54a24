import torch

from bmojo.ops.layout import contiguous_cast


def test_casts_and_lays_out_a_strided_tensor_in_one_result():
    t = torch.randn(2, 5, 3, 4, dtype=torch.bfloat16).permute(0, 2, 1, 3)  # strided view
    out = contiguous_cast(t, torch.float32)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, t.float(), rtol=0, atol=0)


def test_makes_a_strided_tensor_of_the_same_dtype_contiguous():
    t = torch.randn(2, 5, 3, 4).permute(0, 2, 1, 3)
    out = contiguous_cast(t, torch.float32)
    assert out.is_contiguous() and out.data_ptr() != t.data_ptr()
    torch.testing.assert_close(out, t, rtol=0, atol=0)


def test_returns_a_contiguous_tensor_of_the_same_dtype_without_copying():
    t = torch.randn(3, 4)
    assert contiguous_cast(t, torch.float32).data_ptr() == t.data_ptr()


def test_gradient_flows_back_through_the_copy():
    t = torch.randn(2, 5, 3, 4, requires_grad=True)
    out = contiguous_cast(t.permute(0, 2, 1, 3), torch.float64)
    out.backward(torch.ones_like(out))
    assert t.grad.dtype == torch.float32
    torch.testing.assert_close(t.grad, torch.ones_like(t))
