"""Rotary position embedding (DESIGN.md §3.2): half-split layout, absolute positions."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops import apply_rope, rope_angles

DH = 16


def rotate(x: torch.Tensor, positions: list[int] | torch.Tensor, theta: float = 10000.0):
    """Rotate ``x [l, heads, dh]`` (or ``[b, l, heads, dh]``) at ``positions``."""
    positions = torch.as_tensor(positions)
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    return apply_rope(x, cos, sin)


def rotate_vec(v: torch.Tensor, position: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate one vector ``v [dh]`` at ``position``."""
    return rotate(v[None, None], [position], theta)[0, 0]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_angles_shape_and_dtype():
    cos, sin = rope_angles(torch.arange(-3, 7), DH)
    assert cos.shape == sin.shape == (10, DH)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(10, DH), atol=1e-6, rtol=0)
    # cos repeated in both halves, sin negated in the first
    torch.testing.assert_close(cos[:, : DH // 2], cos[:, DH // 2 :], atol=0, rtol=0)
    torch.testing.assert_close(sin[:, : DH // 2], -sin[:, DH // 2 :], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_rounds_as_the_pairwise_formula(dtype):
    """``x·cos + swap(x)·sin`` is ``(x1·c - x2·s, x2·c + x1·s)`` with the same roundings: equal
    bit for bit to the formula written per half."""
    x = randn(2, 9, 3, DH, seed=10).to(dtype)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4095, -1, -30])
    cos, sin = rope_angles(positions, DH)
    c, s = cos[:, None, DH // 2 :], sin[:, None, DH // 2 :]
    x1, x2 = x.float().chunk(2, dim=-1)
    expected = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(dtype)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, atol=0, rtol=0)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_matches_complex_rotation(theta):
    """Independent formula: pair (x_f, x_{f+dh/2}) is the complex number x_f + i x_{f+dh/2},
    multiplied by exp(i * pos * theta^(-2f/dh))."""
    l, heads = 9, 3
    x = randn(2, l, heads, DH, seed=1)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4095, -1, -30])
    out = rotate(x, positions, theta)
    f = torch.arange(DH // 2, dtype=torch.float64)
    angles = positions.double()[:, None] * theta ** (-2 * f / DH)  # [l, dh/2]
    z = torch.complex(x[..., : DH // 2].double(), x[..., DH // 2 :].double())
    zr = z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    expected = torch.cat([zr.real, zr.imag], dim=-1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_preserves_norms():
    x = randn(2, 12, 4, DH, seed=2) * 3
    positions = torch.tensor([0, 1, 2, 3, 7, 64, 65, 1000, 123456, -1, -7, -5000])
    out = rotate(x, positions)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, 1:9], x[:, 1:9])  # it does rotate


def test_position_zero_is_identity():
    x = randn(2, 5, 3, DH, seed=3)
    out = rotate(x, [0] * 5)
    torch.testing.assert_close(out, x, atol=0, rtol=0)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_dot_product_depends_only_on_offset(theta):
    q = randn(DH, seed=4)
    k = randn(DH, seed=5)
    for delta in [0, 1, 3, -2, 17, -40]:
        dots = torch.stack(
            [rotate_vec(q, i, theta) @ rotate_vec(k, i - delta, theta) for i in [0, 5, 41, 300, -9]]
        )
        torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=2e-4, rtol=1e-4)
    # ...and does depend on the offset.
    d1 = rotate_vec(q, 10, theta) @ rotate_vec(k, 9, theta)
    d5 = rotate_vec(q, 10, theta) @ rotate_vec(k, 5, theta)
    assert abs(float(d1 - d5)) > 1e-3


@pytest.mark.parametrize("d", [0, 1, 4, 11, 64])
def test_window_edge_identity(d):
    """<R(i) q, R(i - d) k> == <R(d) q, k>: scoring an eidetic key rotated at position i - d
    equals scoring the unrotated key with q rotated by the distance d."""
    q = randn(6, DH, seed=6)
    k = randn(6, DH, seed=7)
    for i in [d, d + 1, 50, 333]:
        lhs = (rotate(q[:, None], [i] * 6)[:, 0] * rotate(k[:, None], [i - d] * 6)[:, 0]).sum(-1)
        rhs = (rotate(q[:, None], [d] * 6)[:, 0] * k).sum(-1)
        torch.testing.assert_close(lhs, rhs, atol=2e-4, rtol=1e-4)


def test_broadcast_over_leading_dims_and_heads():
    x = randn(3, 6, 2, DH, seed=8)
    positions = torch.arange(10, 16)
    out = rotate(x, positions)
    for b in range(3):
        for t in range(6):
            for h in range(2):
                torch.testing.assert_close(
                    out[b, t, h], rotate_vec(x[b, t, h], int(positions[t])), atol=1e-6, rtol=0
                )


def test_bf16_dtype_preserved_and_close():
    x = randn(2, 8, 2, DH, seed=9).to(torch.bfloat16)
    out = rotate(x, torch.arange(8))
    assert out.dtype == torch.bfloat16
    ref = rotate(x.float(), torch.arange(8))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
