"""Property-based checks: fast paths equal their references on shapes drawn by hypothesis."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bmojo.ops import (
    eidetic_memory_per_chunk,
    eidetic_memory_sequential,
    select_per_chunk,
    ssd_chunked,
    ssd_sequential,
    union_attention_chunked,
    union_attention_reference,
)

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(l=st.integers(1, 80), window=st.integers(1, 12), fading=st.integers(0, 9), chunk=st.integers(1, 16),
       slots=st.integers(0, 6), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_union_attention_chunked_equals_reference(l, window, fading, chunk, slots, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, dh = 1, 2, 4
    q = torch.randn(b, l, h, dh, generator=g)
    k, v, kf, vf = (torch.randn(b, l, kv_heads, dh, generator=g) for _ in range(4))
    memory = {}
    if slots:
        nq = math.ceil(l / chunk)
        memory = dict(mem_k=torch.randn(b, nq, slots, kv_heads, dh, generator=g),
                      mem_v=torch.randn(b, nq, slots, kv_heads, dh, generator=g),
                      mem_pos=torch.randint(-1, l, (b, nq, slots), generator=g),
                      q_mem=torch.randn(b, l, h, dh, generator=g))
    args = (q, k, v, window, fading, kf, vf)
    torch.testing.assert_close(union_attention_chunked(*args, chunk_size=chunk, **memory),
                               union_attention_reference(*args, chunk_size=chunk, **memory), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(l=st.integers(1, 70), chunk=st.integers(1, 24), groups=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_ssd_chunked_equals_sequential(l, chunk, groups, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, p, n = 1, 2, 3, 4
    x = torch.randn(b, l, h, p, generator=g)
    dt = 1e-3 + 0.1 * torch.rand(b, l, h, generator=g)
    A = -1.0 - 15.0 * torch.rand(h, generator=g)
    B, C = torch.randn(b, l, groups, n, generator=g), torch.randn(b, l, groups, n, generator=g)
    s0, D = torch.randn(b, h, p, n, generator=g), torch.randn(h, generator=g)
    y_fast, s_fast = ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=chunk)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D, s0)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_fast, s_ref, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(l=st.integers(1, 90), chunk=st.integers(1, 12), k=st.integers(1, 4), mult=st.integers(0, 5),
       policy=st.sampled_from(["fifo", "score"]), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_eidetic_memory_fast_equals_sequential(l, chunk, k, mult, policy, ties, seed):
    k = min(k, chunk)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, l), generator=g).float() if ties else torch.rand(2, l, generator=g)
    sel_pos, sel_score = select_per_chunk(scores, chunk, k, threshold=1.0 if ties else None)
    fast = eidetic_memory_per_chunk(sel_pos, sel_score, mult * k, policy)
    ref = eidetic_memory_sequential(sel_pos, sel_score, mult * k, policy)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
