"""Long-term eidetic memory in storage in the B'MOJO mixer (DESIGN.md §5, §8).

The reference extends the plain per-query implementation of ``test_bmojo_mixer.py`` with a
hand-written retrieval (Python loops over chunks and blocks): chunk ``n`` retrieves the ``r``
stored blocks (``(b+1)·S - 1 <= n·C - W - F``, the last ``max_blocks`` under ``"evict"``) whose
mean key best matches a query of chunk ``n - 1`` (max over queries and heads).
"""

from __future__ import annotations

import pytest
import torch
from test_bmojo_mixer import (
    BATCH,
    D_MODEL,
    DH,
    H,
    _assert_same_memory,
    _memory_sets,
    _rot,
    hand_memory,
    hand_scores,
    hand_select,
    make_input,
    plain_bmojo,
)

from bmojo.layers import BMojoMixer
from bmojo.ops.rope import apply_rope
from bmojo.ops.storage import StorageBudgetExceeded, block_bytes, retrieval_per_chunk

W, FS, C, K, M = 4, 3, 4, 2, 4
L = 61  # past W + F + M several times; not a multiple of C or of the block sizes below


def make_storage_mixer(seed: int = 0, *, r: int = 2, block: int = 3, capacity: int = M, rope: str = "none",
                       budget_blocks: int = 0, overflow: str = "error", n_kv_heads: int = 2, window: int = W,
                       fading_span: int = FS, ssm_residual: bool = True, policy: str = "score") -> BMojoMixer:
    torch.manual_seed(seed)
    budget = budget_blocks * block_bytes(block, n_kv_heads, DH, 4)
    mixer = BMojoMixer(
        D_MODEL, H, n_kv_heads, window=window, fading_span=fading_span, chunk_size=C, eidetic_per_chunk=K,
        eidetic_capacity=capacity, eidetic_policy=policy, eidetic_rope=rope, ssm_residual=ssm_residual,
        qk_norm=True, d_state=8, ssm_headdim=16, storage_blocks=r, storage_block_size=block,
        storage_budget_bytes=budget, storage_overflow=overflow,
    )
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if mixer.predictor is not None:
            for p in mixer.predictor.parameters():
                p.normal_(0.0, 0.1)
    return mixer.eval()


def hand_retrieval(mixer: BMojoMixer, x: torch.Tensor, max_blocks: int | None = None) -> list[list[list[int]]]:
    """``blocks[b][n]``: the blocks chunk ``n`` retrieves, best first (``n = 0 .. L//C``)."""
    b, length, _ = x.shape
    Wn, Fs, Cs, S, r = mixer.window, mixer.fading_span, mixer.chunk_size, mixer.storage_block_size, \
        mixer.storage_blocks
    hkv = mixer.n_kv_heads
    with torch.no_grad():
        def norm(t, module):
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * module.weight

        q = norm((x @ mixer.q_proj.weight.T).reshape(b, length, H, DH), mixer.q_norm)
        k = norm((x @ mixer.k_proj.weight.T).reshape(b, length, hkv, DH), mixer.k_norm)
        pos = torch.arange(length)
        if mixer.eidetic_rope == "none":
            qe, ke = q, k
        elif mixer.eidetic_rope == "absolute":
            qe, ke = _rot(q, pos), _rot(k, pos)
        else:
            qe, ke = _rot(q, torch.full((length,), Wn + Fs)), k
    out = []
    for bi in range(b):
        rows = [[]]
        for n in range(1, length // Cs + 1):
            count = max(0, (n * Cs - Wn - Fs + 1) // S)
            first = max(0, count - max_blocks) if max_blocks else 0
            scored = []
            for blk in range(first, count):
                summary = ke[bi, blk * S:(blk + 1) * S].mean(0)  # [Hkv, dh]
                best = max(float(qe[bi, i, h] @ summary[h // (H // hkv)])
                           for i in range((n - 1) * Cs, n * Cs) for h in range(H))
                scored.append((-best, blk))
            rows.append([blk for _, blk in sorted(scored)[:r]])
        out.append(rows)
    return out


def positions_of(blocks: list[list[list[int]]], block_size: int) -> list[list[set[int]]]:
    return [[{blk * block_size + o for blk in row for o in range(block_size)} for row in rows] for rows in blocks]


STORAGE_CONFIGS = [  # (r, block size, eidetic capacity, rope)
    (2, 3, M, "none"),
    (1, 5, M, "absolute"),
    (3, 2, 0, "window_edge"),  # storage without eidetic memory
    (2, 4, M, "window_edge"),  # S = C
]


@pytest.mark.parametrize(("r", "block", "capacity", "rope"), STORAGE_CONFIGS)
def test_retrieval_equals_hand(r: int, block: int, capacity: int, rope: str) -> None:
    mixer = make_storage_mixer(seed=1, r=r, block=block, capacity=capacity, rope=rope)
    x = make_input(L, seed=2)
    with torch.no_grad():
        q, k, _ = mixer.project_qkv(x)
        cos, sin = mixer.rope(torch.arange(L))
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        got = retrieval_per_chunk(mixer.eidetic_query(q, q_rot), mixer.eidetic_key(k, k_rot), r, W, FS, C, block,
                                  None, "error")
    expected = hand_retrieval(mixer, x)
    for bi in range(BATCH):
        for n, row in enumerate(expected[bi]):
            assert [int(b) for b in got[bi, n] if b >= 0] == row, (bi, n)
    assert any(len(row) == r for row in expected[0])  # the store does fill up


@pytest.mark.parametrize(("r", "block", "capacity", "rope"), STORAGE_CONFIGS)
def test_forward_and_gradients_equal_plain(r: int, block: int, capacity: int, rope: str) -> None:
    mixer = make_storage_mixer(seed=3, r=r, block=block, capacity=capacity, rope=rope)
    x = make_input(L, seed=4).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    retrieved = positions_of(hand_retrieval(mixer, x.detach()), block)
    y, y_plain = mixer(x), plain_bmojo(mixer, x2, retrieved=retrieved)
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    g = torch.randn(BATCH, L, D_MODEL, generator=torch.Generator().manual_seed(5))
    params = [p for n, p in mixer.named_parameters() if not n.startswith("predictor")]
    got = torch.autograd.grad((y * g).sum(), [x, *params])
    want = torch.autograd.grad((y_plain * g).sum(), [x2, *params])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    # Storage changes the result (the retrieved keys are really attended).
    without = make_storage_mixer(seed=3, r=r, block=block, capacity=capacity, rope=rope)
    without.storage_blocks = 0
    assert not torch.allclose(without(x.detach()), y.detach(), atol=1e-4)


def _check_decoding(mixer: BMojoMixer, x: torch.Tensor, prefix: int, max_blocks: int | None = None) -> None:
    """Prefill ``prefix`` tokens then decode: same outputs as the parallel path, the same
    retrieved blocks per chunk, the store holding exactly the blocks old enough, with the
    keys/values of their positions, and a fixed-size cache apart from the store."""
    length, S = x.shape[1], mixer.storage_block_size
    with torch.no_grad():
        full = mixer(x)
        expected_blocks = hand_retrieval(mixer, x, max_blocks)
        q, k, v = mixer.project_qkv(x)
        cos, sin = mixer.rope(torch.arange(length))
        k_eid = mixer.eidetic_key(k, apply_rope(k, cos, sin))
        cache = mixer.new_cache(BATCH)
        fixed = {name: tuple(getattr(cache, name).shape) for name in ("chunk_q", "ret_k", "ret_pos", "mem_k")
                 if getattr(cache, name) is not None}
        outs = [mixer(x[:, :prefix], cache)] if prefix else []
        for t in range(prefix, length):
            got = [[int(b) for b in row if b >= 0] for row in cache.ret_block]
            assert got == [expected_blocks[bi][t // C] for bi in range(BATCH)], t
            outs.append(mixer.step(x[:, t], cache, t)[:, None])
        assert {name: tuple(getattr(cache, name).shape) for name in fixed} == fixed
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)
    store = cache.store
    written = mixer.stored_blocks(length // C)
    assert store.written == written and store.count == min(written, max_blocks or written)
    ids = store.block_ids()
    assert sorted(ids.tolist()) == list(range(written - store.count, written))
    everything = torch.arange(store.count)[None].expand(BATCH, -1)
    kept_k, kept_v = store.fetch(everything)  # [B, count, S, Hkv, dh]
    for slot, blk in enumerate(ids.tolist()):
        torch.testing.assert_close(kept_k[:, slot], k_eid[:, blk * S:(blk + 1) * S], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(kept_v[:, slot], v[:, blk * S:(blk + 1) * S], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(store.summaries()[slot], k_eid[:, blk * S:(blk + 1) * S].mean(1), atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.parametrize(("r", "block", "capacity", "rope"), STORAGE_CONFIGS)
@pytest.mark.parametrize("prefix", [0, 1, 9, 24, 37])
def test_parallel_equals_recurrent(r: int, block: int, capacity: int, rope: str, prefix: int) -> None:
    mixer = make_storage_mixer(seed=6, r=r, block=block, capacity=capacity, rope=rope)
    _check_decoding(mixer, make_input(L, seed=7), prefix)


def test_eidetic_memory_agrees_with_storage_on() -> None:
    """Storage does not change what the eidetic memory holds (prefill vs decode)."""
    mixer = make_storage_mixer(seed=8, policy="fifo")
    x = make_input(L, seed=9)
    with torch.no_grad():
        decoded = mixer.new_cache(BATCH)
        for t in range(L):
            mixer.step(x[:, t], decoded, t)
        prefilled = mixer.new_cache(BATCH)
        mixer(x, prefilled)
    _assert_same_memory(prefilled, decoded)
    sel = hand_select(hand_scores(mixer, x), C, K, None)
    assert _memory_sets(decoded.mem_pos) == [hand_memory(*sel, M, "fifo")[bi][L // C] for bi in range(BATCH)]


@pytest.mark.parametrize("i", [13, 30, 47])
def test_causality(i: int) -> None:
    mixer = make_storage_mixer(seed=10, rope="absolute")
    x = make_input(L, seed=11)
    x2 = x.clone()
    x2[:, i + 1:] = 3.0 * torch.randn(BATCH, L - i - 1, D_MODEL, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, : i + 1], y[:, : i + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y2[:, i + 1:], y[:, i + 1:], atol=1e-3)


@pytest.mark.parametrize("i", [40, 58])
def test_gradient_reaches_exactly_the_retrieved_tokens(i: int) -> None:
    """Without eidetic memory, fading tokens or SSM residual, output ``i`` depends on inputs
    older than the window only through the retrieved blocks (selection has no gradient)."""
    mixer = make_storage_mixer(seed=13, capacity=0, fading_span=0, window=2, ssm_residual=False, r=2, block=3)
    x = make_input(L, seed=14).requires_grad_(True)
    g = torch.randn(BATCH, D_MODEL, generator=torch.Generator().manual_seed(15))
    (mixer(x)[:, i] * g).sum().backward()
    retrieved = positions_of(hand_retrieval(mixer, x.detach()), 3)
    for bi in range(BATCH):
        visible = retrieved[bi][i // C]
        assert len(visible) == 6
        has_grad = {t for t in range(i - 1) if x.grad[bi, t].abs().max() > 0}
        assert has_grad == visible
        assert x.grad[bi, i + 1:].abs().max() == 0


def test_duplicates_with_eidetic_memory_are_hidden() -> None:
    """A token both in the eidetic memory and in a retrieved block enters the softmax once:
    the plain reference (a set union) agrees, and such overlaps do occur here."""
    mixer = make_storage_mixer(seed=16, r=3, block=2, capacity=8)
    x = make_input(L, seed=17)
    sel = hand_select(hand_scores(mixer, x), C, K, None)
    memory = hand_memory(*sel, 8, "score")
    retrieved = positions_of(hand_retrieval(mixer, x), 2)
    assert any(memory[bi][n] & retrieved[bi][n] for bi in range(BATCH) for n in range(L // C))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x, retrieved=retrieved), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ budget


def test_budget_evict_drops_the_oldest_and_keeps_decoding() -> None:
    mixer = make_storage_mixer(seed=18, budget_blocks=4, overflow="evict")
    assert mixer.storage_capacity(torch.float32) == 4
    x = make_input(L, seed=19)
    with torch.no_grad():
        retrieved = positions_of(hand_retrieval(mixer, x, max_blocks=4), 3)
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x, retrieved=retrieved), atol=1e-5, rtol=1e-5)
    for prefix in (0, 26):
        _check_decoding(mixer, x, prefix, max_blocks=4)


def test_budget_error_raises_clearly() -> None:
    mixer = make_storage_mixer(seed=20, budget_blocks=4, overflow="error")
    x = make_input(L, seed=21)
    short = 4 * 3 + W + FS + 3  # 22 tokens: at most 4 blocks old enough at the last boundary
    with torch.no_grad():
        mixer(x[:, :short])
        with pytest.raises(StorageBudgetExceeded, match="budget"):
            mixer(x)
        cache = mixer.new_cache(BATCH)
        with pytest.raises(StorageBudgetExceeded, match="storage_overflow='evict'"):
            for t in range(L):
                mixer.step(x[:, t], cache, t)
    assert cache.store.written == 4
    tiny = make_storage_mixer(seed=20)
    tiny.storage_budget_bytes = 10
    with pytest.raises(ValueError, match="smaller than one block"):
        tiny.new_cache(BATCH)


@pytest.mark.parametrize(("field", "value"), [("storage_blocks", -1), ("storage_block_size", 0),
                                              ("storage_budget_bytes", -5), ("storage_overflow", "drop")])
def test_invalid_storage_arguments_name_the_field(field: str, value) -> None:
    kwargs = dict(window=4, fading_span=3, chunk_size=4, d_state=8, ssm_headdim=16, storage_blocks=1)
    with pytest.raises(ValueError, match=field):
        BMojoMixer(D_MODEL, H, H, **{**kwargs, field: value})
