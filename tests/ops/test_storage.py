"""The block store and block selection of DESIGN.md §5 (``bmojo.ops.storage``)."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.storage import (
    BlockStore,
    StorageBudgetExceeded,
    block_match_scores,
    entry_positions,
    evicted_block_count,
    gather_positions,
    select_blocks,
    stored_block_count,
)

B, S, HKV, DH = 2, 3, 2, 4


def blocks(n: int, seed: int = 0, dtype=torch.float32, empty: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """``n`` blocks ``(k, v, pos)``; with ``empty``, about a third of the entries are empty
    (position -1), and whole blocks of one sequence sometimes are."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k, v = (torch.randn(B, S, HKV, DH, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(i * S, (i + 1) * S).expand(B, S).clone()
        if empty:
            pos = pos.masked_fill(torch.rand(B, S, generator=gen) < 0.35, -1)
            k, v = k.masked_fill((pos < 0)[..., None, None], 0), v.masked_fill((pos < 0)[..., None, None], 0)
        out.append((k, v, pos))
    return out


def contents(store: BlockStore) -> dict[int, tuple[torch.Tensor, ...]]:
    """block id -> (summary, k, v, pos)."""
    index = torch.arange(store.count)[None].expand(B, -1)
    k, v, pos = store.fetch(index)
    summaries = store.summaries()
    return {int(i): (summaries[s], k[:, s], v[:, s], pos[:, s]) for s, i in enumerate(store.block_ids())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("on_disk", [False, True])
def test_append_fetch_and_grow(tmp_path, on_disk: bool, dtype) -> None:
    store = BlockStore(B, S, HKV, DH, dtype, path=tmp_path / "s.store" if on_disk else None)
    data = blocks(37, dtype=dtype, empty=True)  # more than the initial 16 slots: the store grows twice
    for i, (k, v, pos) in enumerate(data):
        store.append(i, k, v, pos)
    assert store.written == store.count == 37 and store.slots == 64
    got = contents(store)
    assert sorted(got) == list(range(37))
    for i, (k, v, pos) in enumerate(data):
        summary, gk, gv, gpos = got[i]
        assert torch.equal(gk, k) and torch.equal(gv, v) and torch.equal(gpos, pos)
        for b in range(B):  # the mean of the non-empty entries' keys, zeros without one
            valid = pos[b] >= 0
            expected = k[b, valid].float().mean(0) if valid.any() else torch.zeros(HKV, DH)
            torch.testing.assert_close(summary[b], expected.to(dtype))
    assert torch.equal(store.has_entries(), torch.stack([(pos >= 0).any(-1) for _, _, pos in data]))
    assert not store.has_entries().all()  # some sequence's block is all empty
    # Rows read their own sequence: row 0 slot 5, row 1 slot 9.
    k, v, pos = store.fetch(torch.tensor([[5], [9]]))
    assert torch.equal(k[0, 0], data[5][0][0]) and torch.equal(v[1, 0], data[9][1][1])
    assert torch.equal(pos[1, 0], data[9][2][1])


@pytest.mark.parametrize("on_disk", [False, True])
def test_evict_keeps_the_newest(tmp_path, on_disk: bool) -> None:
    store = BlockStore(B, S, HKV, DH, torch.float32, max_blocks=5, overflow="evict",
                       path=tmp_path / "s.store" if on_disk else None)
    data = blocks(12)
    for i, block in enumerate(data):
        store.append(i, *block)
    assert store.written == 12 and store.count == 5 and store.slots == 5
    got = contents(store)
    assert sorted(got) == list(range(7, 12))
    assert all(torch.equal(got[i][1], data[i][0]) for i in got)


def test_error_policy_raises_and_keeps_the_store(tmp_path) -> None:
    store = BlockStore(B, S, HKV, DH, torch.float32, max_blocks=3, overflow="error", path=tmp_path / "s.store")
    data = blocks(4)
    for i in range(3):
        store.append(i, *data[i])
    with pytest.raises(StorageBudgetExceeded, match=r"s\.store is full: 3 blocks"):
        store.append(3, *data[3])
    assert store.written == 3 and sorted(contents(store)) == [0, 1, 2]


@pytest.mark.parametrize("max_blocks", [None, 4])
def test_reopen_gives_the_same_store(tmp_path, max_blocks) -> None:
    path = tmp_path / "s.store"
    store = BlockStore(B, S, HKV, DH, torch.float32, max_blocks=max_blocks, overflow="evict", path=path)
    data = blocks(9, empty=True)
    for i, block in enumerate(data):
        store.append(i, *block)
    store.flush()
    before = contents(store)
    has_entries = store.has_entries().clone()
    del store
    reopened = BlockStore.open(path, B, S, HKV, DH, torch.float32, max_blocks=max_blocks, overflow="evict")
    assert reopened.written == 9
    after = contents(reopened)
    assert sorted(after) == sorted(before)
    for i in before:
        assert all(torch.equal(a, b) for a, b in zip(before[i], after[i], strict=True))
    assert torch.equal(reopened.has_entries(), has_entries)
    extra = blocks(1, seed=5)[0]
    reopened.append(9, *extra)  # and it keeps working
    assert torch.equal(contents(reopened)[9][1], extra[0])


def _written(tmp_path, n: int = 5):
    path = tmp_path / "s.store"
    store = BlockStore(B, S, HKV, DH, torch.float32, path=path)
    for i, block in enumerate(blocks(n)):
        store.append(i, *block)
    store.flush()
    del store
    return path


def test_truncated_file_is_a_clear_error(tmp_path) -> None:
    path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"s\.store is truncated or corrupted"):
        BlockStore.open(path, B, S, HKV, DH, torch.float32)
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"s\.store is truncated"):
        BlockStore.open(path, B, S, HKV, DH, torch.float32)


def test_corrupted_record_is_a_clear_error(tmp_path) -> None:
    path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[64 + 16 + 5] ^= 0xFF  # a byte of the first record's positions
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"s\.store is corrupted: record 0 \(block 0\) fails its checksum"):
        BlockStore.open(path, B, S, HKV, DH, torch.float32)


def test_wrong_file_or_shape_is_a_clear_error(tmp_path) -> None:
    path = _written(tmp_path)
    with pytest.raises(ValueError, match="this model needs"):
        BlockStore.open(path, B, S + 1, HKV, DH, torch.float32)
    with pytest.raises(ValueError, match="this model needs"):
        BlockStore.open(path, B, S, HKV, DH, torch.bfloat16)
    with pytest.raises(ValueError, match="another budget"):
        BlockStore.open(path, B, S, HKV, DH, torch.float32, max_blocks=2, overflow="evict")
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 200)
    with pytest.raises(ValueError, match=r"other\.bin is not a bmojo block store"):
        BlockStore.open(other, B, S, HKV, DH, torch.float32)
    with pytest.raises(FileNotFoundError):
        BlockStore.open(tmp_path / "missing", B, S, HKV, DH, torch.float32)


def test_stored_block_count() -> None:
    # W = 4, F = 3, C = 4, S = 3: block b is written once (b+1)*3 - 1 <= 4n - 7.
    counts = [stored_block_count(n, 4, 3, 4, 3) for n in range(8)]
    assert counts == [0, 0, 0, 2, 3, 4, 6, 7]
    for n, count in enumerate(counts):
        assert all((b + 1) * 3 - 1 <= 4 * n - 7 for b in range(count))
        assert (count + 1) * 3 - 1 > 4 * n - 7


def test_evicted_block_count() -> None:
    # k = 2 entries dropped per boundary, blocks of S = 3: n boundaries fill 2n // 3 blocks.
    assert [evicted_block_count(n, 2, 3) for n in range(7)] == [0, 0, 1, 2, 2, 3, 4]


def test_select_blocks_and_scores() -> None:
    scores = torch.tensor([[0.5, 2.0, float("-inf"), 2.0], [1.0, float("-inf"), float("-inf"), float("-inf")]])
    ids = torch.tensor([[7, 3, 9, 1], [4, 5, 6, 8]])
    index, picked = select_blocks(scores, ids, 3)
    assert picked.tolist() == [[1, 3, 7], [4, -1, -1]]  # ties to the smaller id; -inf stays empty
    assert index.tolist() == [[3, 1, 0], [0, -1, -1]]
    _, padded = select_blocks(scores[:, :2], ids[:, :2], 4)
    assert padded.tolist() == [[3, 7, -1, -1], [4, -1, -1, -1]]
    block_pos = torch.tensor([[[0, 1, 2], [7, -1, 5], [3, 4, 6]]])  # [B=1, m=3, S=3]
    assert entry_positions(block_pos, torch.tensor([[[1, -1], [2, 0]]])).tolist() == \
        [[[7, -1, 5, -1, -1, -1], [3, 4, 6, 0, 1, 2]]]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, DH, generator=gen)  # [B, n, H, dh], H = 4 query heads on HKV = 2
    summary = torch.randn(2, 6, HKV, DH, generator=gen)
    expected = torch.stack([torch.tensor([max(float(q[b, i, h] @ summary[b, m, h // 2]) for i in range(5)
                                              for h in range(4)) for m in range(6)]) for b in range(2)])
    torch.testing.assert_close(block_match_scores(q, summary), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_gather_positions_reads_each_position_and_position_zero_for_minus_one(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(2, 7, HKV, DH, generator=gen) * 10).to(dtype)  # [B, L, Hkv, dh]
    pos = torch.randint(-1, 7, (2, 3, 5), generator=gen)  # [B, nq, M]
    got = gather_positions(t, pos)
    assert got.shape == (2, 3, 5, HKV, DH) and got.dtype == dtype
    for b in range(2):
        for i in range(3):
            for m in range(5):
                assert torch.equal(got[b, i, m], t[b, max(int(pos[b, i, m]), 0)])


def test_gather_positions_gradient_adds_up_every_read() -> None:
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(2, 6, HKV, DH, generator=gen, requires_grad=True)
    pos = torch.tensor([[[0, 3, 3], [5, -1, 0]], [[2, 2, 2], [1, 4, -1]]])  # repeats and -1 (reads 0)
    weight = torch.randn(2, 2, 3, HKV, DH, generator=gen)
    (gather_positions(t, pos) * weight).sum().backward()
    expected = torch.zeros_like(t)
    for b in range(2):
        for i in range(2):
            for m in range(3):
                expected[b, max(int(pos[b, i, m]), 0)] += weight[b, i, m]
    torch.testing.assert_close(t.grad, expected)
