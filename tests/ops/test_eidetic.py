"""Innovation test, per-chunk selection and eidetic memory contents (DESIGN.md §4), checked
against plain-Python implementations of the spec."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops import (
    eidetic_dropped_per_chunk,
    eidetic_memory_dropped,
    eidetic_memory_per_chunk,
    eidetic_memory_sequential,
    eidetic_memory_update,
    innovation_scores,
    rank_order,
    select_per_chunk,
    selection_scores,
    top_ranked,
)

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- plain Python


def py_rank(entries):
    """Entries ``(pos, score)`` ranked by score descending, then position ascending."""
    return sorted(entries, key=lambda e: (-e[1], e[0]))


def py_select(scores, chunk_size, k, threshold=None):
    """Per complete chunk, the k best ``(pos, score)``; emptied (-1, -inf) if score <= τ."""
    out = []
    for c in range(len(scores) // chunk_size):
        chunk = [(t, scores[t]) for t in range(c * chunk_size, (c + 1) * chunk_size)]
        best = py_rank(chunk)[:k]
        if threshold is not None:
            best = [(-1, NEG_INF) if s <= threshold else (t, s) for t, s in best]
        out.append(best)
    return out


def py_fifo_memory(selections, capacity, k, c):
    """Chunk c sees the selections of chunks c - M/k .. c - 1, oldest first (empty before 0)."""
    entries = []
    for cc in range(c - capacity // k, c):
        entries += selections[cc] if cc >= 0 else [(-1, NEG_INF)] * k
    return entries


def py_score_memory(selections, capacity, c):
    """Chunk c sees the M best ranked selections of chunks < c, padded with empties."""
    pool = [e for cc in range(c) for e in selections[cc]]
    best = py_rank(pool)[:capacity]
    return best + [(-1, NEG_INF)] * (capacity - len(best))


def random_scores(b, l, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties inside every chunk
        return torch.randint(0, 4, (b, l), generator=gen).float()
    return torch.rand(b, l, generator=gen)


def to_pairs(pos, score):
    return list(zip(pos.tolist(), score.tolist(), strict=True))


# ----------------------------------------------------------------------------- rank_order


@pytest.mark.parametrize("seed", range(5))
def test_rank_order_matches_python(seed):
    gen = torch.Generator().manual_seed(seed)
    b, m = 3, 12
    score = torch.randint(0, 3, (b, m), generator=gen).float()
    score[torch.rand(b, m, generator=gen) < 0.25] = NEG_INF
    pos = torch.stack([torch.randperm(40, generator=gen)[:m] for _ in range(b)])
    pos[score == NEG_INF] = -1
    order = rank_order(score, pos)
    assert order.shape == (b, m)
    for r in range(b):
        assert sorted(order[r].tolist()) == list(range(m))  # a permutation
        got = to_pairs(pos[r][order[r]], score[r][order[r]])
        assert got == py_rank(to_pairs(pos[r], score[r]))
        ranked = score[r][order[r]]
        n_empty = int((score[r] == NEG_INF).sum())
        assert torch.all(ranked[m - n_empty :] == NEG_INF)  # empties last
        assert torch.all(ranked[: m - n_empty] > NEG_INF)


@pytest.mark.parametrize("k", [1, 3, 50, 80])
@pytest.mark.parametrize("seed", range(4))
def test_top_ranked_equals_rank_order(seed, k):
    """Ties (few distinct scores), -inf, +-0.0, negative and huge scores, positions -1 and
    large, in any order: the same first k entries as the two stable sorts."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([NEG_INF, -3e38, -2.5, -0.0, 0.0, 1e-30, 2.5, 3e38, float("inf")])
    score = values[torch.randint(0, len(values), (3, 5, 60), generator=gen)]
    pos = torch.randperm(60, generator=gen).expand(3, 5, 60) * 1000003 % (2**31 - 2) - 1
    order = top_ranked(score, pos, k)
    assert torch.equal(order, rank_order(score, pos)[..., :k])


def test_rank_order_tie_break_by_position():
    score = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0]])
    pos = torch.tensor([[9, 7, 3, 8, 5]])
    order = rank_order(score, pos)
    assert pos[0][order[0]].tolist() == [7, 8, 3, 5, 9]


# ----------------------------------------------------------------------------- select_per_chunk


@pytest.mark.parametrize("threshold", [None, 1.0, 0.5])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize(("l", "chunk_size", "k"), [(64, 8, 3), (70, 8, 2), (7, 8, 2), (30, 5, 5)])
def test_select_per_chunk_matches_python(l, chunk_size, k, ties, threshold):
    b = 3
    score = random_scores(b, l, seed=l + k, ties=ties)
    sel_pos, sel_score = select_per_chunk(score, chunk_size, k, threshold)
    nc = l // chunk_size  # the incomplete last chunk is ignored
    assert sel_pos.shape == (b, nc, k) and sel_score.shape == (b, nc, k)
    assert sel_pos.dtype == torch.long
    for r in range(b):
        expected = py_select(score[r].tolist(), chunk_size, k, threshold)
        for c in range(nc):
            assert to_pairs(sel_pos[r, c], sel_score[r, c]) == expected[c]
    # Nothing from the incomplete last chunk.
    assert torch.all(sel_pos < nc * chunk_size)


def test_select_ignores_incomplete_chunk_even_if_best():
    score = torch.zeros(1, 11)
    score[0, 10] = 100.0  # in the incomplete chunk [8, 11)
    score[0, 3] = 5.0
    sel_pos, _ = select_per_chunk(score, 4, 1)
    assert sel_pos.tolist() == [[[3], [4]]]  # chunk 1: all zero, earliest position wins


def test_select_threshold_empties():
    score = torch.tensor([[0.5, 2.0, 0.2, 1.0, 3.0, 0.9, 0.1, 0.0]])
    sel_pos, sel_score = select_per_chunk(score, 4, 3, threshold=1.0)
    # chunk 0: ranked 1(2.0), 3(1.0), 0(0.5): 1.0 <= τ and 0.5 <= τ are emptied.
    assert sel_pos.tolist() == [[[1, -1, -1], [4, -1, -1]]]
    assert sel_score[0, 0, 0] == 2.0 and sel_score[0, 1, 0] == 3.0
    assert torch.all(sel_score[0, :, 1:] == NEG_INF)


# ----------------------------------------------------------------------------- selection_scores


def test_selection_recent_picks_last_k():
    b, l, chunk_size, k = 2, 35, 8, 3
    innovation = torch.rand(b, l, generator=torch.Generator().manual_seed(0))
    scores = selection_scores(innovation, torch.arange(l), "recent")
    assert scores.shape == (b, l) and scores.dtype == torch.float32
    sel_pos, _ = select_per_chunk(scores, chunk_size, k)
    for c in range(l // chunk_size):
        end = (c + 1) * chunk_size
        expected = list(range(end - 1, end - k - 1, -1))  # rank order: latest first
        assert sel_pos[:, c].tolist() == [expected] * b


def test_selection_recent_with_offset_positions():
    """Positions are absolute (decoding offset): still the last k of each chunk."""
    innovation = torch.rand(1, 16)
    positions = torch.arange(100, 116)
    sel_pos, _ = select_per_chunk(selection_scores(innovation, positions, "recent"), 8, 2)
    assert sel_pos.tolist() == [[[7, 6], [15, 14]]]


def test_selection_topk_returns_innovation():
    gen = torch.Generator().manual_seed(1)
    innovation = torch.rand(3, 20, generator=gen, dtype=torch.float64)
    scores = selection_scores(innovation, torch.arange(20), "topk")
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, innovation.float(), atol=0, rtol=0)
    bf = innovation.to(torch.bfloat16)
    torch.testing.assert_close(selection_scores(bf, torch.arange(20), "topk"), bf.float())


def test_selection_random_properties():
    b, l = 3, 4096
    innovation = torch.rand(b, l, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(l)
    s0 = selection_scores(innovation, positions, "random", seed=0)
    assert s0.shape == (b, l) and s0.dtype == torch.float32
    # Deterministic for a seed, independent of the innovation and the same for every row.
    torch.testing.assert_close(
        s0, selection_scores(torch.zeros(b, l), positions, "random", seed=0), atol=0, rtol=0
    )
    assert torch.equal(s0[0], s0[1]) and torch.equal(s0[0], s0[2])
    # Depends on the position only: a sub-range gives the same values (decoder == prefill).
    part = selection_scores(innovation[:, 100:300], positions[100:300], "random", seed=0)
    assert torch.equal(part, s0[:, 100:300])
    # Values in [0, 1), spread over the interval.
    assert float(s0.min()) >= 0.0 and float(s0.max()) < 1.0
    hist = torch.histc(s0[0], bins=10, min=0.0, max=1.0)
    assert torch.all((hist > 0.07 * l) & (hist < 0.13 * l)), hist
    # Differs across seeds.
    s1 = selection_scores(innovation, positions, "random", seed=1)
    assert (s0 != s1).float().mean() > 0.99
    assert float((s0[0] - s1[0]).abs().mean()) > 0.2


def test_selection_random_uniform_positions():
    """The chosen offsets inside a chunk are roughly uniform (no position is favoured)."""
    l, chunk_size, k = 8192, 16, 2
    scores = selection_scores(torch.zeros(1, l), torch.arange(l), "random", seed=3)
    sel_pos, _ = select_per_chunk(scores, chunk_size, k)
    offsets = (sel_pos % chunk_size).flatten()
    counts = torch.bincount(offsets, minlength=chunk_size).float()
    expected = offsets.numel() / chunk_size  # 64 per offset
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0, counts  # 15 degrees of freedom: p(chi2 > 45) ~ 1e-4


@pytest.mark.parametrize("bad", ["top-k", "Random", "", "innovation"])
def test_selection_invalid(bad):
    with pytest.raises(ValueError):
        selection_scores(torch.rand(1, 4), torch.arange(4), bad)


# ----------------------------------------------------------------------------- innovation


def test_innovation_scores_is_mean_squared_difference():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 12, generator=gen)
    x_hat = torch.randn(2, 5, 12, generator=gen)
    s = innovation_scores(x, x_hat)
    assert s.shape == (2, 5) and s.dtype == torch.float32
    expected = torch.tensor(
        [
            [
                sum(
                    (a - c) ** 2
                    for a, c in zip(x[i, t].tolist(), x_hat[i, t].tolist(), strict=True)
                )
                / 12
                for t in range(5)
            ]
            for i in range(2)
        ]
    )
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(innovation_scores(x, x), torch.zeros(2, 5), atol=0, rtol=0)
    sb = innovation_scores(x.to(torch.bfloat16), x_hat.to(torch.bfloat16))
    assert sb.dtype == torch.float32
    torch.testing.assert_close(sb, expected, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- memory


def make_selections(b, l, chunk_size, k, threshold, seed, ties=True):
    return select_per_chunk(random_scores(b, l, seed, ties), chunk_size, k, threshold)


CAPACITY_FACTORS = [0, 1, 3, 100]  # M = factor * k; 100k is more than all selections


@pytest.mark.parametrize("threshold", [None, 1.0])
@pytest.mark.parametrize("factor", CAPACITY_FACTORS)
@pytest.mark.parametrize("policy", ["fifo", "score"])
@pytest.mark.parametrize(("l", "chunk_size", "k"), [(83, 8, 2), (48, 4, 1), (40, 8, 8)])
def test_per_chunk_matches_sequential(l, chunk_size, k, policy, factor, threshold):
    b = 3
    capacity = factor * k
    sel_pos, sel_score = make_selections(b, l, chunk_size, k, threshold, seed=l + factor)
    nc = l // chunk_size
    pos_seq, score_seq = eidetic_memory_sequential(sel_pos, sel_score, capacity, policy)
    pos_fast, score_fast = eidetic_memory_per_chunk(sel_pos, sel_score, capacity, policy)
    assert pos_seq.shape == pos_fast.shape == (b, nc + 1, capacity)
    assert score_seq.shape == score_fast.shape == (b, nc + 1, capacity)
    assert torch.equal(pos_fast, pos_seq)
    assert torch.equal(score_fast, score_seq)

    # Both equal the plain-Python spec of the policy.
    selections = [[to_pairs(sel_pos[r, c], sel_score[r, c]) for c in range(nc)] for r in range(b)]
    for r in range(b):
        for c in range(nc + 1):
            if policy == "fifo":
                expected = py_fifo_memory(selections[r], capacity, k, c)
            else:
                expected = py_score_memory(selections[r], capacity, c)
            assert to_pairs(pos_fast[r, c], score_fast[r, c]) == expected, (r, c)


@pytest.mark.parametrize("threshold", [None, 1.0])
@pytest.mark.parametrize("factor", [1, 3, 100])
@pytest.mark.parametrize("policy", ["fifo", "score"])
@pytest.mark.parametrize("split", [0, 1, 4, 9])
def test_memory_continued_from_an_initial_memory(split, policy, factor, threshold):
    """A sequence's chunks ``split ..`` folded from the memory the first ``split`` chunks left
    (a decoder's cache, DESIGN.md §7) see exactly what they see in one pass over all chunks."""
    b, chunk_size, k = 3, 8, 2
    capacity = factor * k
    sel_pos, sel_score = make_selections(b, 83, chunk_size, k, threshold, seed=split + factor)
    whole_pos, whole_score = eidetic_memory_sequential(sel_pos, sel_score, capacity, policy)
    initial = (whole_pos[:, split], whole_score[:, split])
    for fn in (eidetic_memory_sequential, eidetic_memory_per_chunk):
        pos, score = fn(sel_pos[:, split:], sel_score[:, split:], capacity, policy, initial=initial)
        assert torch.equal(pos, whole_pos[:, split:]), fn.__name__
        assert torch.equal(score, whole_score[:, split:]), fn.__name__


@pytest.mark.parametrize("threshold", [None, 1.0])
@pytest.mark.parametrize("factor", [1, 3])
@pytest.mark.parametrize("policy", ["fifo", "score"])
def test_dropped_per_chunk_matches_the_decoder_and_python(policy, factor, threshold):
    """What each boundary drops: the parallel form equals the decoder's fold of
    ``eidetic_memory_update`` + ``eidetic_memory_dropped``, and the plain-Python set difference
    ``(memory ∪ selections) − next memory`` ranked, padded with empties to k."""
    b, chunk_size, k = 3, 8, 2
    capacity = factor * k
    sel_pos, sel_score = make_selections(b, 83, chunk_size, k, threshold, seed=factor)
    mem_pos, mem_score = eidetic_memory_per_chunk(sel_pos, sel_score, capacity, policy)
    pos, score = eidetic_dropped_per_chunk(sel_pos, sel_score, mem_pos, mem_score)
    nc = sel_pos.shape[1]
    assert pos.shape == score.shape == (b, nc, k)
    state_pos, state_score = mem_pos[:, 0], mem_score[:, 0]
    for c in range(nc):
        all_pos = torch.cat([state_pos, sel_pos[:, c]], 1)
        all_score = torch.cat([state_score, sel_score[:, c]], 1)
        keep = eidetic_memory_update(state_pos, state_score, sel_pos[:, c], sel_score[:, c], policy)
        dropped = eidetic_memory_dropped(all_pos, all_score, keep, k)
        assert torch.equal(all_pos.gather(1, dropped), pos[:, c]), c
        assert torch.equal(all_score.gather(1, dropped), score[:, c]), c
        state_pos, state_score = all_pos.gather(1, keep), all_score.gather(1, keep)
        for r in range(b):
            before = to_pairs(mem_pos[r, c], mem_score[r, c]) + to_pairs(sel_pos[r, c], sel_score[r, c])
            after = {p for p, _ in to_pairs(mem_pos[r, c + 1], mem_score[r, c + 1])}
            gone = py_rank([(p, s_) for p, s_ in before if p >= 0 and p not in after])
            assert to_pairs(pos[r, c], score[r, c]) == gone + [(-1, NEG_INF)] * (k - len(gone))
    assert (pos >= 0).any()  # entries do leave the memory


def test_fifo_memory_contents_explicit():
    """M = 2k: chunk c holds exactly the selections of chunks c-2 and c-1."""
    capacity = 4  # k = 2
    sel_pos = torch.tensor([[[1, 0], [5, 6], [-1, -1], [13, 12]]])
    sel_score = torch.tensor([[[3.0, 2.0], [4.0, 1.0], [NEG_INF, NEG_INF], [9.0, 0.5]]])
    for fn in (eidetic_memory_sequential, eidetic_memory_per_chunk):
        pos, _ = fn(sel_pos, sel_score, capacity, "fifo")
        assert pos.tolist() == [
            [
                [-1, -1, -1, -1],
                [-1, -1, 1, 0],
                [1, 0, 5, 6],
                [5, 6, -1, -1],
                [-1, -1, 13, 12],
            ]
        ], fn.__name__


def test_score_memory_contents_explicit():
    sel_pos = torch.tensor([[[1, 0], [5, 6], [9, 8]]])
    sel_score = torch.tensor([[[3.0, 2.0], [4.0, 2.0], [3.0, 0.5]]])
    for fn in (eidetic_memory_sequential, eidetic_memory_per_chunk):
        pos, score = fn(sel_pos, sel_score, 3, "score")
        assert pos.tolist() == [[[-1, -1, -1], [1, 0, -1], [5, 1, 0], [5, 1, 9]]], fn.__name__
        assert score[0, 3].tolist() == [4.0, 3.0, 3.0]


def test_memory_update_matches_policies():
    mem_pos = torch.tensor([[3, 1, 0]])
    mem_score = torch.tensor([[5.0, 2.0, 1.0]])
    new_pos = torch.tensor([[7, 6]])
    new_score = torch.tensor([[2.0, 9.0]])
    cat_pos = torch.cat([mem_pos, new_pos], 1)
    idx = eidetic_memory_update(mem_pos, mem_score, new_pos, new_score, "fifo")
    assert cat_pos.gather(1, idx).tolist() == [[0, 7, 6]]
    idx = eidetic_memory_update(mem_pos, mem_score, new_pos, new_score, "score")
    assert cat_pos.gather(1, idx).tolist() == [[6, 3, 1]]  # 9, 5, then tie at 2.0: 1 before 7


@pytest.mark.parametrize("capacity", [0, 4])
@pytest.mark.parametrize("bad", ["lru", "FIFO", ""])
def test_invalid_policy(bad, capacity):
    sel_pos, sel_score = make_selections(2, 32, 8, 2, None, seed=0)
    with pytest.raises(ValueError):
        eidetic_memory_per_chunk(sel_pos, sel_score, capacity, bad)
    with pytest.raises(ValueError):
        eidetic_memory_sequential(sel_pos, sel_score, capacity, bad)
    with pytest.raises(ValueError):  # no complete chunk
        eidetic_memory_sequential(sel_pos[:, :0], sel_score[:, :0], capacity, bad)
    mem_pos = torch.full((2, 4), -1)
    mem_score = torch.full((2, 4), NEG_INF)
    with pytest.raises(ValueError):
        eidetic_memory_update(mem_pos, mem_score, sel_pos[:, 0], sel_score[:, 0], bad)


def test_memory_is_causal():
    """Chunk c's memory only depends on selections of chunks < c."""
    sel_pos, sel_score = make_selections(2, 64, 8, 2, None, seed=5, ties=False)
    for policy in ("fifo", "score"):
        base_pos, base_score = eidetic_memory_per_chunk(sel_pos, sel_score, 6, policy)
        score2 = sel_score.clone()
        score2[:, 4:] = 100.0 + torch.rand_like(score2[:, 4:])
        pos2, s2 = eidetic_memory_per_chunk(sel_pos, score2, 6, policy)
        assert torch.equal(pos2[:, :5], base_pos[:, :5])
        assert torch.equal(s2[:, :5], base_score[:, :5])
        assert not torch.equal(s2[:, 5:], base_score[:, 5:])
