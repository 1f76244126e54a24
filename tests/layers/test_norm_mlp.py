"""RMSNorm, the gated RMSNorm of the Mamba-2 block and the SwiGLU MLP (DESIGN.md §3.1, §6),
checked against formulas written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bmojo.layers import GatedRMSNorm, RMSNorm, SwiGLU


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dim", [1, 8, 48])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rmsnorm_formula(dim: int, eps: float) -> None:
    gen = _gen(dim)
    norm = RMSNorm(dim, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    x = 3.0 * torch.randn(2, 5, dim, generator=gen)
    expected = torch.empty_like(x)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(5)):
        row = x[idx[0], idx[1]]
        rms = torch.sqrt((row**2).sum() / dim + eps)
        expected[idx[0], idx[1]] = row / rms * norm.weight.detach()
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_default_weight_is_one_and_unit_rms() -> None:
    norm = RMSNorm(32)
    torch.testing.assert_close(norm.weight.detach(), torch.ones(32), atol=0, rtol=0)
    x = torch.randn(4, 32, generator=_gen(0)) * 10
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(4), atol=1e-4, rtol=1e-4)
    # Scale invariance (up to eps).
    torch.testing.assert_close(norm(7.0 * x), out, atol=1e-5, rtol=1e-5)


def test_rmsnorm_keeps_dtype_and_computes_in_float32() -> None:
    norm = RMSNorm(16)
    x = torch.randn(3, 16, generator=_gen(1)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = norm(x.float())
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    # Values whose square overflows float16 still normalise (float32 inside).
    big = torch.full((1, 16), 1000.0, dtype=torch.float16)
    out_big = norm(big)
    assert out_big.dtype == torch.float16
    assert torch.isfinite(out_big).all()
    torch.testing.assert_close(out_big.float(), torch.ones(1, 16), atol=1e-2, rtol=1e-2)


def test_rmsnorm_gradient_matches_hand_formula() -> None:
    gen = _gen(2)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=gen))
    x = torch.randn(5, 8, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    w = norm.weight.detach().clone().requires_grad_(True)
    g = torch.randn(5, 8, generator=gen)
    (norm(x) * g).sum().backward()
    (x2 / torch.sqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * w * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w.grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- GatedRMSNorm


def _gated_by_hand(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int,
                   eps: float) -> torch.Tensor:
    """Per group of ``dim / n_groups`` consecutive channels: ``g / rms(g)``, ``g = y silu(z)``."""
    dim = y.shape[-1]
    size = dim // n_groups
    gated = y * z * torch.sigmoid(z)
    out = torch.empty_like(gated)
    for gi in range(n_groups):
        part = gated[..., gi * size:(gi + 1) * size]
        ms = (part * part).sum(-1, keepdim=True) / size
        out[..., gi * size:(gi + 1) * size] = part / torch.sqrt(ms + eps)
    return out * weight


@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_gated_rmsnorm_groupwise_by_hand(n_groups: int, eps: float) -> None:
    gen = _gen(10 + n_groups)
    dim = 16
    norm = GatedRMSNorm(dim, n_groups=n_groups, eps=eps)
    assert norm.weight.shape == (dim,)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    # Groups of very different scale: a whole-vector RMS would give a different answer.
    scale = torch.logspace(-1, 1, dim)
    y = torch.randn(3, 7, dim, generator=gen) * scale
    z = torch.randn(3, 7, dim, generator=gen)
    expected = _gated_by_hand(y, z, norm.weight.detach(), n_groups, eps)
    torch.testing.assert_close(norm(y, z), expected, atol=1e-5, rtol=1e-5)


def test_gated_rmsnorm_groups_are_independent() -> None:
    gen = _gen(20)
    norm = GatedRMSNorm(16, n_groups=2, eps=1e-12)
    y = torch.randn(4, 16, generator=gen)
    z = torch.randn(4, 16, generator=gen)
    out = norm(y, z)
    # Scaling the second group's input leaves the first group's output unchanged and the
    # second group's output unchanged too (scale invariance within a group).
    y2 = y.clone()
    y2[:, 8:] *= 100.0
    torch.testing.assert_close(norm(y2, z), out, atol=1e-5, rtol=1e-5)
    # With one group the same change does alter the first half.
    norm1 = GatedRMSNorm(16, n_groups=1, eps=1e-12)
    assert not torch.allclose(norm1(y2, z)[:, :8], norm1(y, z)[:, :8], atol=1e-3)
    # Each group has unit RMS (weight = 1).
    torch.testing.assert_close(out.unflatten(-1, (2, 8)).pow(2).mean(-1), torch.ones(4, 2),
                               atol=1e-4, rtol=1e-4)


def test_gated_rmsnorm_gate_is_before_norm() -> None:
    """``norm_before_gate=False``: a gate uniform across the group cancels out."""
    gen = _gen(21)
    norm = GatedRMSNorm(8, n_groups=1, eps=1e-12)
    y = torch.randn(2, 8, generator=gen)
    z = torch.full((2, 8), 2.0)
    torch.testing.assert_close(norm(y, z), RMSNorm(8, eps=1e-12)(y), atol=1e-5, rtol=1e-5)


def test_gated_rmsnorm_bad_groups_and_dtype() -> None:
    with pytest.raises(ValueError):
        GatedRMSNorm(10, n_groups=3)
    norm = GatedRMSNorm(8, n_groups=2)
    y = torch.randn(2, 8, generator=_gen(3)).to(torch.bfloat16)
    z = torch.randn(2, 8, generator=_gen(4)).to(torch.bfloat16)
    out = norm(y, z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(y.float(), z.float()), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize(("d_model", "hidden"), [(32, 64), (48, 40)])
def test_swiglu_shapes_and_formula(d_model: int, hidden: int) -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(d_model, hidden)
    shapes = {name: tuple(p.shape) for name, p in mlp.named_parameters()}
    assert shapes == {
        "gate_proj.weight": (hidden, d_model),
        "up_proj.weight": (hidden, d_model),
        "down_proj.weight": (d_model, hidden),
    }  # no biases
    x = torch.randn(2, 5, d_model, generator=_gen(5))
    out = mlp(x)
    assert out.shape == x.shape
    wg, wu, wd = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                  mlp.down_proj.weight.detach())
    a = x @ wg.T
    expected = ((a * torch.sigmoid(a)) * (x @ wu.T)) @ wd.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Gate and up are not interchangeable: silu is applied to the gate branch only.
    swapped = (F.silu(x @ wu.T) * (x @ wg.T)) @ wd.T
    assert not torch.allclose(out, swapped, atol=1e-3)


def test_swiglu_works_on_any_leading_shape() -> None:
    torch.manual_seed(1)
    mlp = SwiGLU(32, 16)
    x = torch.randn(3, 2, 4, 32, generator=_gen(6))
    torch.testing.assert_close(mlp(x)[1, 0], mlp(x[1, 0]), atol=1e-6, rtol=1e-6)
    assert mlp(torch.randn(32, generator=_gen(7))).shape == (32,)
