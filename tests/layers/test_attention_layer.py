"""Attention layer (DESIGN.md §6 `A` and `W` mixers, §7, §8.1–§8.3): full causal and sliding
window against a plain explicit-mask implementation, decoding, and causality."""

from __future__ import annotations

import sys

import pytest
import torch

from bmojo.layers import Attention, KVBuffer
from bmojo.ops.rope import apply_rope, rope_angles

D_MODEL, H = 32, 4
DH = D_MODEL // H


def make_attention(n_kv_heads: int, window: int | None, qk_norm: bool, seed: int = 0,
                   **kwargs) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(D_MODEL, H, n_kv_heads, window=window, qk_norm=qk_norm, **kwargs)
    if qk_norm:  # non-trivial norm weights, so that q_norm and k_norm cannot be swapped
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    return attn.eval()


def _input(L: int, seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed))


def plain_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Explicit ``L x L`` mask + softmax, GQA by repeating key heads, RoPE half-split."""
    b, L, _ = x.shape
    hkv = attn.k_proj.weight.shape[0] // DH
    q = (x @ attn.q_proj.weight.T).reshape(b, L, H, DH)
    k = (x @ attn.k_proj.weight.T).reshape(b, L, hkv, DH)
    v = (x @ attn.v_proj.weight.T).reshape(b, L, hkv, DH)
    if attn.q_norm is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.k_norm.weight
    cos, sin = rope_angles(torch.arange(L), DH, attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // hkv, dim=2)  # query head i reads key head i // (H / Hkv)
    v = v.repeat_interleave(H // hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / DH**0.5
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    mask = j <= i
    if attn.window is not None:
        mask = mask & (j > i - attn.window)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, L, H * DH)
    return out @ attn.o_proj.weight.T


KV_HEADS = [4, 2, 1]
WINDOWS = [None, 1, 5, 16]


@pytest.mark.parametrize("n_kv_heads", KV_HEADS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("L", [1, 37])
def test_forward_equals_plain_attention(n_kv_heads: int, window: int | None, qk_norm: bool,
                                        L: int) -> None:
    attn = make_attention(n_kv_heads, window, qk_norm, seed=n_kv_heads)
    x = _input(L, seed=L)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 64])
def test_block_size_does_not_change_the_result(block_size: int) -> None:
    attn = make_attention(2, 5, True, seed=1, block_size=block_size)
    x = _input(23, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_gradients_equal_plain_attention() -> None:
    attn = make_attention(2, 5, True, seed=3)
    x = _input(29, seed=4).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 29, D_MODEL, generator=torch.Generator().manual_seed(5))
    (attn(x) * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    (plain_attention(attn, x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for n, p in attn.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_only_a_window_uses_the_attention_kernel(monkeypatch) -> None:
    """Full causal attention is SDPA whichever ``attention_kernel``: a Transformer layer asks for
    no Triton; a windowed one does, and says so when triton is missing."""
    monkeypatch.setitem(sys.modules, "bmojo.ops.attention_triton", None)  # an import of it raises ImportError
    full = make_attention(2, window=None, qk_norm=False, attention_kernel="triton")
    reference = make_attention(2, window=None, qk_norm=False)
    x = _input(20, seed=3)
    torch.testing.assert_close(full(x), reference(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_kernel='triton': "):
        make_attention(2, window=4, qk_norm=False, attention_kernel="triton")


@pytest.mark.parametrize("window", [None, 4])
def test_unknown_attention_kernel_is_a_value_error(window) -> None:
    with pytest.raises(ValueError, match="^attention_kernel='cuda' is invalid: must be one of"):
        make_attention(2, window=window, qk_norm=False, attention_kernel="cuda")


def test_parameter_names() -> None:
    attn = make_attention(2, 4, True)
    assert {n: tuple(p.shape) for n, p in attn.named_parameters()} == {
        "q_proj.weight": (H * DH, D_MODEL),
        "k_proj.weight": (2 * DH, D_MODEL),
        "v_proj.weight": (2 * DH, D_MODEL),
        "o_proj.weight": (D_MODEL, H * DH),
        "q_norm.weight": (DH,),
        "k_norm.weight": (DH,),
    }
    assert {n for n, _ in make_attention(2, 4, False).named_parameters()} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    with pytest.raises(ValueError):
        Attention(D_MODEL, 3, 1)
    with pytest.raises(ValueError):
        Attention(D_MODEL, 4, 3)


def _decode(attn: Attention, x: torch.Tensor, prefix: int, cache: KVBuffer,
            slot_counts: list[int]) -> torch.Tensor:
    outs = []
    if prefix:
        outs.append(attn(x[:, :prefix], cache))
    for t in range(prefix, x.shape[1]):
        outs.append(attn.step(x[:, t], cache, t)[:, None])
        slot_counts.append(cache.k.shape[1])
    return torch.cat(outs, 1)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("window", [1, 5])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("prefix", [0, 3, 12])
def test_sliding_window_decoding_equals_forward(n_kv_heads: int, window: int, qk_norm: bool,
                                                prefix: int) -> None:
    attn = make_attention(n_kv_heads, window, qk_norm, seed=6)
    L = 30  # several windows
    x = _input(L, seed=prefix + 7)
    cache = attn.new_cache(2, max_seq_len=8)
    assert not cache.growable
    assert cache.k.shape == cache.v.shape == (2, window, n_kv_heads, DH)
    counts: list[int] = []
    with torch.no_grad():
        full = attn(x)
        decoded = _decode(attn, x, prefix, cache, counts)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    assert set(counts) == {window}  # the ring never grows
    assert cache.k.shape == (2, window, n_kv_heads, DH)
    assert sorted(cache.pos.tolist()) == list(range(L - window, L))


@pytest.mark.parametrize("n_kv_heads", [4, 1])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("prefix", [0, 5, 11])
def test_full_attention_decoding_grows_buffer(n_kv_heads: int, qk_norm: bool, prefix: int) -> None:
    attn = make_attention(n_kv_heads, None, qk_norm, seed=8)
    L, capacity = 30, 8
    x = _input(L, seed=prefix + 9)
    cache = attn.new_cache(2, max_seq_len=capacity)
    assert cache.growable and cache.k.shape[1] == capacity
    counts: list[int] = []
    with torch.no_grad():
        full = attn(x)
        decoded = _decode(attn, x, prefix, cache, counts)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape[1] >= L > capacity  # grew past max_seq_len
    assert counts == sorted(counts)
    held = cache.pos[cache.pos >= 0]
    assert sorted(held.tolist()) == list(range(L))


def test_ring_buffer_holds_rotated_keys_of_last_window() -> None:
    attn = make_attention(2, 4, True, seed=10)
    x = _input(11, seed=11)
    cache = attn.new_cache(2, max_seq_len=0)
    with torch.no_grad():
        attn(x, cache)
        q, k, v = attn.project_qkv(x)
        cos, sin = rope_angles(torch.arange(11), DH, attn.rope_theta)
        k = apply_rope(k, cos, sin)
    for slot in range(4):
        p = int(cache.pos[slot])
        assert p % 4 == slot and 7 <= p <= 10
        torch.testing.assert_close(cache.k[:, slot], k[:, p], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.v[:, slot], v[:, p], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("i", [0, 9, 25])
def test_causality(window: int | None, i: int) -> None:
    attn = make_attention(2, window, True, seed=12)
    L = 40
    x = _input(L, seed=13)
    x2 = x.clone()
    x2[:, i + 1:] = torch.randn(2, L - i - 1, D_MODEL, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y2[:, : i + 1], y[:, : i + 1], atol=1e-6, rtol=1e-6)
    if i + 1 < L:
        assert not torch.allclose(y2[:, i + 1:], y[:, i + 1:], atol=1e-3)


def test_kv_buffer_read_returns_held_positions_and_zeros():
    ring = KVBuffer.empty(1, 4, 1, 2, False, "cpu", torch.float32)
    keys = torch.arange(1.0, 7.0)[None, :, None, None].expand(1, 6, 1, 2)  # key of position p is p + 1
    ring.write(keys, -keys, 0)  # holds positions 2..5
    k, v = ring.read(0, 7)
    assert k[0, :, 0, 0].tolist() == [0, 0, 3, 4, 5, 6, 0]
    assert torch.equal(v, -k)
