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
                       fading_span: int = FS, ssm_residual: bool = True, policy: str = "score",
                       source: str = "raw", threshold: float | None = None) -> BMojoMixer:
    torch.manual_seed(seed)
    budget = budget_blocks * block_bytes(block, n_kv_heads, DH, 4)
    mixer = BMojoMixer(
        D_MODEL, H, n_kv_heads, window=window, fading_span=fading_span, chunk_size=C, eidetic_per_chunk=K,
        eidetic_capacity=capacity, eidetic_policy=policy, eidetic_rope=rope, ssm_residual=ssm_residual,
        qk_norm=True, d_state=8, ssm_headdim=16, storage_blocks=r, storage_block_size=block,
        storage_budget_bytes=budget, storage_overflow=overflow, storage_source=source,
        innovation_threshold=threshold,
    )
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if mixer.predictor is not None:
            for p in mixer.predictor.parameters():
                p.normal_(0.0, 0.1)
    return mixer.eval()


def hand_eidetic_qk(mixer: BMojoMixer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries and keys the eidetic memory and the store use, from the spec."""
    b, length, _ = x.shape
    with torch.no_grad():
        def norm(t, module):
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * module.weight

        q = norm((x @ mixer.q_proj.weight.T).reshape(b, length, H, DH), mixer.q_norm)
        k = norm((x @ mixer.k_proj.weight.T).reshape(b, length, mixer.n_kv_heads, DH), mixer.k_norm)
        pos = torch.arange(length)
        if mixer.eidetic_rope == "none":
            return q, k
        if mixer.eidetic_rope == "absolute":
            return _rot(q, pos), _rot(k, pos)
        return _rot(q, torch.full((length,), mixer.window + mixer.fading_span)), k


def hand_block_entries(mixer: BMojoMixer, x: torch.Tensor) -> tuple[list[list[list[int]]], list[int]]:
    """``(entries[b][blk], counts)``: the positions of the entries of every block the sequence
    writes (``-1``: empty entry), and the number of blocks stored at each boundary
    ``n = 0 .. L//C``. ``"raw"``: position-aligned blocks old enough. ``"evicted"``: at every
    boundary, ``(memory ∪ selections) − next memory`` ranked (score desc, position asc) and
    padded with empties to ``k``, in one stream cut into blocks of ``S``."""
    b, length, _ = x.shape
    Wn, Fs, Cs, S = mixer.window, mixer.fading_span, mixer.chunk_size, mixer.storage_block_size
    nc = length // Cs
    if mixer.storage_source == "raw":
        counts = [max(0, (n * Cs - Wn - Fs + 1) // S) for n in range(nc + 1)]
        return [[list(range(blk * S, (blk + 1) * S)) for blk in range(counts[-1])] for _ in range(b)], counts
    k = mixer.eidetic_per_chunk
    score = hand_scores(mixer, x)
    sel = hand_select(score, Cs, k, mixer.innovation_threshold)
    memory = hand_memory(*sel, mixer.eidetic_capacity, mixer.eidetic_policy)
    entries = []
    for bi in range(b):
        stream = []
        for c in range(nc):
            before = memory[bi][c] | {int(p) for p in sel[0][bi, c] if p >= 0}
            gone = sorted(before - memory[bi][c + 1], key=lambda t: (-float(score[bi, t]), t))
            stream += gone + [-1] * (k - len(gone))
        entries.append([stream[blk * S:(blk + 1) * S] for blk in range(len(stream) // S)])
    return entries, [n * k // S for n in range(nc + 1)]


def hand_retrieval(mixer: BMojoMixer, x: torch.Tensor, max_blocks: int | None = None) -> list[list[list[int]]]:
    """``blocks[b][n]``: the blocks chunk ``n`` retrieves, best first (``n = 0 .. L//C``): the
    ``r`` stored blocks with a non-empty entry whose mean key (of those entries) best matches a
    query of chunk ``n - 1`` (max over its queries and the heads); ties to the older block."""
    b, length, _ = x.shape
    Cs, r, hkv = mixer.chunk_size, mixer.storage_blocks, mixer.n_kv_heads
    qe, ke = hand_eidetic_qk(mixer, x)
    entries, counts = hand_block_entries(mixer, x)
    out = []
    for bi in range(b):
        rows = [[]]
        for n in range(1, length // Cs + 1):
            first = max(0, counts[n] - max_blocks) if max_blocks else 0
            scored = []
            for blk in range(first, counts[n]):
                valid = [t for t in entries[bi][blk] if t >= 0]
                if not valid:
                    continue
                summary = ke[bi, valid].mean(0)  # [Hkv, dh]
                best = max(float(qe[bi, i, h] @ summary[h // (H // hkv)])
                           for i in range((n - 1) * Cs, n * Cs) for h in range(H))
                scored.append((-best, blk))
            rows.append([blk for _, blk in sorted(scored)[:r]])
        out.append(rows)
    return out


def positions_of(mixer: BMojoMixer, x: torch.Tensor, blocks: list[list[list[int]]]) -> list[list[set[int]]]:
    """The positions of the non-empty entries of the retrieved blocks, per sequence and chunk."""
    entries, _ = hand_block_entries(mixer, x)
    return [[{t for blk in row for t in entries[bi][blk] if t >= 0} for row in rows]
            for bi, rows in enumerate(blocks)]


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
        entries, counts = hand_block_entries(mixer, x)
        block_pos = torch.tensor(entries, dtype=torch.long).view(BATCH, counts[-1], block)
        got = retrieval_per_chunk(mixer.eidetic_query(q, q_rot), mixer.eidetic_key(k, k_rot), block_pos,
                                  counts[1:], r, C, None, "error")
    expected = hand_retrieval(mixer, x)
    for bi in range(BATCH):
        for n, row in enumerate(expected[bi]):
            assert [int(b) for b in got[bi, n] if b >= 0] == row, (bi, n)
    assert any(len(row) == r for row in expected[0])  # the store does fill up


def _assert_equals_plain(mixer: BMojoMixer, x: torch.Tensor, blocks: list[list[list[int]]], seed: int,
                         tau: float | None = None) -> torch.Tensor:
    """The layer's output and its gradients (input and weights but the predictor's) equal the
    plain reference's given the hand-computed retrieved ``blocks``; returns the output."""
    x = x.detach().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_plain = mixer(x), plain_bmojo(mixer, x2, tau=tau, retrieved=positions_of(mixer, x.detach(), blocks))
    torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
    g = torch.randn(BATCH, L, D_MODEL, generator=torch.Generator().manual_seed(seed))
    params = [p for n, p in mixer.named_parameters() if not n.startswith("predictor")]
    got = torch.autograd.grad((y * g).sum(), [x, *params])
    want = torch.autograd.grad((y_plain * g).sum(), [x2, *params])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    return y.detach()


@pytest.mark.parametrize(("r", "block", "capacity", "rope"), STORAGE_CONFIGS)
def test_forward_and_gradients_equal_plain(r: int, block: int, capacity: int, rope: str) -> None:
    mixer = make_storage_mixer(seed=3, r=r, block=block, capacity=capacity, rope=rope)
    x = make_input(L, seed=4)
    y = _assert_equals_plain(mixer, x, hand_retrieval(mixer, x), seed=5)
    # Storage changes the result (the retrieved keys are really attended).
    without = make_storage_mixer(seed=3, r=r, block=block, capacity=capacity, rope=rope)
    without.storage_blocks = 0
    assert not torch.allclose(without(x), y, atol=1e-4)


def _check_decoding(mixer: BMojoMixer, x: torch.Tensor, prefix: int, max_blocks: int | None = None) -> None:
    """Prefill ``prefix`` tokens then decode: same outputs as the parallel path, the same
    retrieved blocks per chunk, the store holding exactly the blocks written so far, with the
    positions of their entries and those positions' keys/values, and a fixed-size cache apart
    from the store."""
    length = x.shape[1]
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
    kept_k, kept_v, kept_pos = store.fetch(everything)  # [B, count, S, Hkv, dh], [B, count, S]
    entries, _ = hand_block_entries(mixer, x)
    for slot, blk in enumerate(ids.tolist()):
        for bi in range(BATCH):
            assert kept_pos[bi, slot].tolist() == entries[bi][blk]
            valid = kept_pos[bi, slot] >= 0
            at = kept_pos[bi, slot, valid]
            torch.testing.assert_close(kept_k[bi, slot, valid], k_eid[bi, at], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(kept_v[bi, slot, valid], v[bi, at], atol=1e-6, rtol=1e-6)
            assert not kept_k[bi, slot, ~valid].any() and not kept_v[bi, slot, ~valid].any()
            if valid.any():
                torch.testing.assert_close(store.summaries()[slot, bi], k_eid[bi, at].mean(0), atol=1e-6, rtol=1e-6)
    if mixer.storage_source == "evicted":
        assert any(t >= 0 for row in entries for blk in row for t in blk)  # entries did leave the memory


@pytest.mark.parametrize(("r", "block", "capacity", "rope"), STORAGE_CONFIGS)
@pytest.mark.parametrize("prefix", [0, 1, 9, 24, 37])
def test_parallel_equals_recurrent(r: int, block: int, capacity: int, rope: str, prefix: int) -> None:
    mixer = make_storage_mixer(seed=6, r=r, block=block, capacity=capacity, rope=rope)
    _check_decoding(mixer, make_input(L, seed=7), prefix)


EVICTED_CONFIGS = [  # (r, block size, policy, innovation threshold, rope)
    (2, 3, "score", None, "none"),
    (1, 4, "fifo", None, "absolute"),
    (3, 2, "score", 0.9, "window_edge"),  # thresholded selections: empty entries in the stream
    (2, 5, "fifo", 0.9, "none"),
]


@pytest.mark.parametrize(("r", "block", "policy", "threshold", "rope"), EVICTED_CONFIGS)
def test_evicted_entries_forward_and_gradients_equal_plain(r, block, policy, threshold, rope) -> None:
    """``storage_source="evicted"``: the store holds what left the eidetic memory; the layer
    equals the plain reference given the hand-computed stream of dropped entries."""
    mixer = make_storage_mixer(seed=22, r=r, block=block, policy=policy, threshold=threshold, rope=rope,
                               source="evicted")
    x = make_input(L, seed=23)
    blocks = hand_retrieval(mixer, x)
    assert any(len(row) == r for row in blocks[0])  # the store does fill up
    y = _assert_equals_plain(mixer, x, blocks, seed=24, tau=threshold)
    raw = make_storage_mixer(seed=22, r=r, block=block, policy=policy, threshold=threshold, rope=rope)
    assert not torch.allclose(raw(x), y, atol=1e-4)  # another store, another result


@pytest.mark.parametrize(("r", "block", "policy", "threshold", "rope"), EVICTED_CONFIGS)
@pytest.mark.parametrize("prefix", [0, 9, 24])
def test_evicted_entries_parallel_equals_recurrent(r, block, policy, threshold, rope, prefix) -> None:
    mixer = make_storage_mixer(seed=25, r=r, block=block, policy=policy, threshold=threshold, rope=rope,
                               source="evicted")
    _check_decoding(mixer, make_input(L, seed=26), prefix)


def test_evicted_entries_with_a_budget_evict_the_oldest_blocks() -> None:
    mixer = make_storage_mixer(seed=27, budget_blocks=3, overflow="evict", source="evicted", block=2)
    x = make_input(L, seed=28)
    with torch.no_grad():
        retrieved = positions_of(mixer, x, hand_retrieval(mixer, x, max_blocks=3))
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x, retrieved=retrieved), atol=1e-5, rtol=1e-5)
    _check_decoding(mixer, x, 13, max_blocks=3)


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
    retrieved = positions_of(mixer, x.detach(), hand_retrieval(mixer, x.detach()))
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
    retrieved = positions_of(mixer, x, hand_retrieval(mixer, x))
    assert any(memory[bi][n] & retrieved[bi][n] for bi in range(BATCH) for n in range(L // C))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x, retrieved=retrieved), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ budget


def test_budget_evict_drops_the_oldest_and_keeps_decoding() -> None:
    mixer = make_storage_mixer(seed=18, budget_blocks=4, overflow="evict")
    assert mixer.storage_capacity(torch.float32) == 4
    x = make_input(L, seed=19)
    with torch.no_grad():
        retrieved = positions_of(mixer, x, hand_retrieval(mixer, x, max_blocks=4))
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
                                              ("storage_budget_bytes", -5), ("storage_overflow", "drop"),
                                              ("storage_source", "all"), ("storage_source", "evicted")])
def test_invalid_storage_arguments_name_the_field(field: str, value) -> None:
    kwargs = dict(window=4, fading_span=3, chunk_size=4, d_state=8, ssm_headdim=16, storage_blocks=1)
    with pytest.raises(ValueError, match=field):
        BMojoMixer(D_MODEL, H, H, **{**kwargs, field: value})
