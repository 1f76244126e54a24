"""Long-term eidetic memory in storage (DESIGN.md §5): block retrieval and the block store.

**What is stored** (``storage_source``), in blocks of ``S`` entries, keys in the eidetic
memory's representation (unrotated for ``eidetic_rope="none"``), each entry with its position:

- ``"raw"``: the raw tokens older than the window, position-aligned: block ``b`` holds
  positions ``[b·S, (b+1)·S)``. At the boundary before query chunk ``n`` (position ``n·C``) the
  store holds every block whose positions are all ``<= n·C - W - F``
  (:func:`stored_block_count`), so a retrieved key never duplicates a raw-window key or a
  fading token's range, and is visible to every query ``i`` of the chunk (``t <= i - W``).
- ``"evicted"``: the entries that leave the eidetic memory. The update at the end of every
  chunk drops exactly ``k`` entries of ``[memory ; the chunk's selections]`` (ranked; empty
  ones, position ``-1``, included so that every sequence of a batch drops as many); they
  form one stream, ``k`` per boundary, cut into blocks of ``S``: at the boundary before chunk
  ``n`` the store holds ``n·k // S`` blocks (:func:`evicted_block_count`). An entry is
  visible to query ``i`` when its position is ``<= i - W``, as in the eidetic memory.

A block's **summary** is the mean key of its non-empty entries (per key head); a block
without one is never retrieved.

**When.** Writes and reads happen at chunk boundaries only (asynchronous update).

**Which blocks.** Chunk ``n`` retrieves the ``r`` stored blocks with the highest score
``max over the C queries of chunk n-1 and over the query heads of q_mem·summary`` (the
eidetic query of DESIGN.md §3). Chunk ``n-1`` is complete at that boundary, so the choice
depends only on the past and a decoder makes it exactly as the parallel path does (the
asynchronous reading of §5's "max over the chunk's queries": the queries of chunk ``n``
itself are not known when chunk ``n`` starts). Chunk 0 retrieves nothing. Ties go to the
older block; blocks that score ``-inf`` (none stored) stay empty (``-1``).

**Budget.** ``max_blocks`` (from a byte budget per layer and sequence) caps the store:
``"error"`` raises :class:`StorageBudgetExceeded` when a block would exceed it, ``"evict"``
drops the oldest block.

:class:`BlockStore` keeps the blocks of one layer for a batch of sequences, in host RAM or
in a memory-mapped file (format in its docstring).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bmojo.ops.eidetic import top_ranked

OVERFLOW_POLICIES = ("error", "evict")
STORAGE_SOURCES = ("raw", "evicted")


class StorageBudgetExceeded(ValueError):
    """The store of a layer is full and its overflow policy is ``"error"``."""


def stored_block_count(n: int, window: int, fading_span: int, chunk_size: int, block_size: int) -> int:
    """Blocks written to the store at the boundary before query chunk ``n``: those whose last
    position ``(b+1)·S - 1`` is ``<= n·C - W - F``."""
    return max(0, (n * chunk_size - window - fading_span + 1) // block_size)


def evicted_block_count(n: int, per_chunk: int, block_size: int) -> int:
    """Blocks of evicted entries in the store at the boundary before query chunk ``n``: the
    ``n·k`` entries dropped so far, in blocks of ``S``."""
    return n * per_chunk // block_size


def block_bytes(block_size: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one block takes per sequence: keys, values, the summary and the positions."""
    return (2 * block_size + 1) * kv_heads * head_dim * itemsize + 8 * block_size


def block_summary(k: Tensor, pos: Tensor) -> Tensor:
    """Mean key of the non-empty entries of each block, float32 (zeros for an empty block):
    ``k [..., S, Hkv, dh]``, ``pos [..., S]`` -> ``[..., Hkv, dh]``."""
    valid = (pos >= 0).to(torch.float32)[..., None, None]  # [..., S, 1, 1]
    return (k.float() * valid).sum(-3) / valid.sum(-3).clamp(min=1)


def gather_positions(t: Tensor, pos: Tensor) -> Tensor:
    """``t [B, L, *rest]`` at ``pos [B, *idx]`` (``-1`` reads position 0, to be masked by the
    caller) -> ``[B, *idx, *rest]``. Differentiable with respect to ``t``.

    Whole rows of the flattened ``[B*L, *rest]`` by ``index_select``, whose backward adds each
    gradient row at once: ``gather`` with the index expanded over ``rest`` scatters element by
    element backwards, 1.4-3.7x slower forward+backward (docs/performance.md)."""
    b, length, rest = t.shape[0], t.shape[1], t.shape[2:]
    rows = pos.clamp(min=0).reshape(b, -1) + torch.arange(b, device=pos.device)[:, None] * length  # [B, n]
    return t.reshape(b * length, *rest).index_select(0, rows.flatten()).view(*pos.shape, *rest)


def raw_block_positions(count: int, block_size: int, device=None) -> Tensor:
    """Positions of the tokens of raw blocks ``0 .. count-1``: ``[count, S]``."""
    return torch.arange(count * block_size, device=device).view(count, block_size)


def capacity_from_budget(budget_bytes: int, block_size: int, kv_heads: int, head_dim: int,
                         dtype: torch.dtype) -> int | None:
    """Blocks a budget of ``budget_bytes`` per layer and sequence holds (``None``: no budget)."""
    if budget_bytes == 0:
        return None
    one = block_bytes(block_size, kv_heads, head_dim, torch.empty((), dtype=dtype).element_size())
    if budget_bytes < one:
        raise ValueError(f"storage_budget_bytes={budget_bytes} is smaller than one block ({one} bytes per layer "
                         f"and sequence in {dtype}): raise it or set it to 0 (no budget)")
    return budget_bytes // one


def block_match_scores(queries: Tensor, summary: Tensor) -> Tensor:
    """``max over queries and query heads of q·summary``, in float32.

    ``queries [B, ..., n, H, dh]`` (the ``n`` queries of a chunk), ``summary [B, m, Hkv, dh]``
    -> ``[B, ..., m]``. Query head ``h`` reads key head ``h // (H // Hkv)`` (grouped queries)."""
    *lead, n, h, dh = queries.shape
    hkv = summary.shape[2]
    q = queries.float().reshape(*lead, n, hkv, h // hkv, dh)
    s = summary.float().reshape(lead[0], *([1] * (len(lead) - 1)), *summary.shape[1:])  # [B, 1.., m, Hkv, dh]
    scores = torch.einsum("...nkgd,...mkd->...nkgm", q, s)  # [B, ..., n, Hkv, g, m]
    return scores.flatten(-4, -2).amax(-2)


def select_blocks(scores: Tensor, block_ids: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The ``r`` best blocks: ``scores [B, ..., m]`` (``-inf`` = not available) and
    ``block_ids [B, ..., m]`` -> ``(index [B, ..., r] into m, ids [B, ..., r])``, best first,
    ties to the smaller id; ``-1`` where fewer than ``r`` blocks are available."""
    m = scores.shape[-1]
    order = top_ranked(scores, block_ids, r)
    empty = torch.isinf(scores.gather(-1, order))
    index = order.masked_fill(empty, -1)
    ids = block_ids.gather(-1, order).masked_fill(empty, -1)
    if m < r:
        pad = (*index.shape[:-1], r - m)
        index = torch.cat([index, index.new_full(pad, -1)], -1)
        ids = torch.cat([ids, ids.new_full(pad, -1)], -1)
    return index, ids


def entry_positions(block_pos: Tensor, block_ids: Tensor) -> Tensor:
    """Positions of the entries of blocks ``block_ids [B, ..., r]`` (``-1``: no block), from
    every block's positions ``block_pos [B, m, S]`` -> ``[B, ..., r·S]`` (``-1`` where empty)."""
    pos = gather_positions(block_pos, block_ids)  # [B, ..., r, S]
    return pos.masked_fill(block_ids[..., None] < 0, -1).flatten(-2)


def retrieval_per_chunk(q_mem: Tensor, k_mem: Tensor, block_pos: Tensor, counts: list[int], r: int,
                        chunk_size: int, max_blocks: int | None, overflow: str) -> Tensor:
    """Parallel path: the blocks each query chunk ``n = 0 .. L//C`` retrieves, ``[B, L//C + 1, r]``.

    ``q_mem [B, L, H, dh]`` (eidetic queries), ``k_mem [B, L, Hkv, dh]`` (keys as stored),
    ``block_pos [B, m, S]`` the positions of the entries of every block the sequence writes
    (``-1``: empty entry), ``counts[n - 1]`` the blocks in the store at the boundary before
    chunk ``n``. Entry ``n`` is what chunk ``n`` sees (the last entry is for the chunk after a
    sequence that ends on a chunk boundary). Same result as a decoder applying
    :func:`select_blocks` to its :class:`BlockStore` at every boundary.
    """
    b, length = q_mem.shape[:2]
    C = chunk_size
    nc = length // C
    blocks = torch.full((b, nc + 1, r), -1, dtype=torch.long, device=q_mem.device)
    total = counts[-1] if counts else 0
    if max_blocks is not None and overflow == "error" and total > max_blocks:
        raise StorageBudgetExceeded(f"{length} tokens write {total} blocks to the store of a layer, more than its "
                                    f"budget of {max_blocks} blocks (storage_overflow='error')")
    if total == 0:
        return blocks
    block_pos = block_pos[:, :total]  # [B, m, S]
    summary = block_summary(gather_positions(k_mem, block_pos), block_pos)  # [B, m, Hkv, dh]
    queries = q_mem[:, : nc * C].unflatten(1, (nc, C))  # [B, nc, C, H, dh]: chunk c = n - 1
    scores = block_match_scores(queries, summary)  # [B, nc, m]
    ids = torch.arange(total, device=q_mem.device)
    count = torch.tensor(counts, device=q_mem.device)[:, None]  # [nc, 1]
    available = (ids < count)[None] & (block_pos >= 0).any(-1)[:, None, :]  # [B, nc, m]
    if max_blocks is not None:
        available &= ids >= count - max_blocks  # "evict": the oldest are gone
    scores = scores.masked_fill(~available, float("-inf"))
    _, blocks[:, 1:] = select_blocks(scores, ids.expand_as(scores), r)
    return blocks


_MAGIC = b"BMOJOSTO"
_VERSION = 2  # 2: every record holds its entries' positions
_HEADER = struct.Struct("<8sIIIIIIQQQ")  # magic, version, dtype, batch, S, Hkv, dh, capacity, count, written
_HEADER_BYTES = 64
_PREFIX_BYTES = 16  # per record: block id (int64), crc32 of the payload (int64)
_DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_INITIAL_SLOTS = 16


class BlockStore:
    """The store of one layer: blocks of ``S`` keys/values for ``B`` sequences, with summaries.

    Slots form a ring of ``max_blocks`` slots when a budget is set (slot = write index mod
    ``max_blocks``), else grow by doubling. Every record is ``[block id (int64) | crc32
    (int64) | positions [B, S] (int64) | summary [B, Hkv, dh] | k [B, S, Hkv, dh] | v [B, S,
    Hkv, dh]]``, the last three in ``dtype``; an empty entry has position ``-1`` and zero
    key and value. The block index, what retrieval scans at every boundary, is also kept in
    RAM, contiguous: the summaries (``1 / 2S`` of the bytes of the keys and values) and which
    blocks hold an entry of each sequence; :meth:`open` rebuilds it from the records.

    In RAM (``path=None``) the records live in one CPU tensor. On disk they live in a
    memory-mapped file: a 64-byte header (magic ``BMOJOSTO``, version, dtype, ``B``, ``S``,
    ``Hkv``, ``dh``, slots, valid slots, blocks written) then the records; the header is
    rewritten after every append, so the file is consistent whenever a block is complete.
    :meth:`open` checks the header, the file length and every record's crc32 and raises a
    ``ValueError`` naming the file when one is wrong.
    """

    def __init__(self, batch: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_blocks: int | None = None, overflow: str = "error", path: str | Path | None = None):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"a block store holds {list(_DTYPE_CODES)}, not {dtype}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"storage_overflow={overflow!r} is invalid: must be one of {OVERFLOW_POLICIES}")
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks} must be >= 1 or None")
        self.batch, self.block_size, self.kv_heads, self.head_dim = batch, block_size, kv_heads, head_dim
        self.dtype, self.max_blocks, self.overflow = dtype, max_blocks, overflow
        self.path = None if path is None else Path(path)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.pos_bytes = batch * block_size * 8
        self.summary_bytes = batch * kv_heads * head_dim * self.itemsize
        self.kv_bytes = batch * block_size * kv_heads * head_dim * self.itemsize
        self.payload_bytes = self.pos_bytes + self.summary_bytes + 2 * self.kv_bytes
        self.record_bytes = -(-(_PREFIX_BYTES + self.payload_bytes) // 8) * 8  # 8-byte aligned records
        self.count = 0  # valid slots
        self.written = 0  # blocks appended so far, evicted ones included
        self._mmap = None
        self._records = torch.zeros(0, self.record_bytes, dtype=torch.uint8)
        # The block index, in RAM: [slots, B, Hkv, dh] summaries and [slots, B] non-empty flags.
        self._index_summaries = torch.zeros(0, batch, kv_heads, head_dim, dtype=dtype)
        self._has_entries = torch.zeros(0, batch, dtype=torch.bool)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(_HEADER_BYTES)
            self._map(0)

    # ------------------------------------------------------------------ file mapping

    def _map(self, slots: int) -> None:
        """(Re)map the file with room for ``slots`` records and write the header."""
        self._records = torch.zeros(0, self.record_bytes, dtype=torch.uint8)
        if self._mmap is not None:
            self._mmap.flush()
            self._mmap = None
        with open(self.path, "r+b") as f:
            f.truncate(_HEADER_BYTES + slots * self.record_bytes)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r+")
        self._records = torch.from_numpy(self._mmap[_HEADER_BYTES:]).view(slots, self.record_bytes)
        self._write_header()

    def _write_header(self) -> None:
        header = _HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self.dtype], self.batch, self.block_size,
                              self.kv_heads, self.head_dim, self.slots, self.count, self.written)
        self._mmap[: len(header)] = np.frombuffer(header, dtype=np.uint8)

    @classmethod
    def open(cls, path: str | Path, batch: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
             max_blocks: int | None = None, overflow: str = "error") -> BlockStore:
        """Reopen a store file written by a store of these shapes (e.g. to resume a decode)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"block store {path} does not exist")
        size = path.stat().st_size
        if size < _HEADER_BYTES:
            raise ValueError(f"block store {path} is truncated: {size} bytes, shorter than its header")
        with open(path, "rb") as f:
            magic, version, code, *shape, slots, count, written = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"{path} is not a bmojo block store (version {_VERSION}): bad magic or version")
        expected = (batch, block_size, kv_heads, head_dim, _DTYPE_CODES.get(dtype))
        if (*shape, code) != expected:
            raise ValueError(f"block store {path} holds (batch, block size, kv heads, head dim, dtype code) = "
                             f"{(*shape, code)}, this model needs {expected}")
        store = cls(batch, block_size, kv_heads, head_dim, dtype, max_blocks, overflow)
        store.path = path
        if size != _HEADER_BYTES + slots * store.record_bytes:
            raise ValueError(f"block store {path} is truncated or corrupted: {size} bytes, its header says "
                             f"{_HEADER_BYTES + slots * store.record_bytes}")
        if count > slots or count != min(written, max_blocks or written) or (max_blocks and slots > max_blocks):
            raise ValueError(f"block store {path} is corrupted or was written with another budget: {count} valid "
                             f"slots of {slots}, {written} blocks written, budget {max_blocks} blocks")
        store.count, store.written = count, written
        store._mmap = np.memmap(path, dtype=np.uint8, mode="r+")
        store._records = torch.from_numpy(store._mmap[_HEADER_BYTES:]).view(slots, store.record_bytes)
        for slot in range(count):
            prefix = store._records[slot, :_PREFIX_BYTES].view(torch.int64)
            if int(prefix[1]) != zlib.crc32(store._records[slot, _PREFIX_BYTES:][: store.payload_bytes].numpy()):
                raise ValueError(f"block store {path} is corrupted: record {slot} (block {int(prefix[0])}) fails "
                                 f"its checksum")
        store._has_entries = torch.zeros(slots, batch, dtype=torch.bool)
        store._has_entries[:count] = (store.positions() >= 0).any(-1)
        store._index_summaries = torch.zeros(slots, batch, kv_heads, head_dim, dtype=dtype)
        store._index_summaries[:count] = store._payload(store.pos_bytes, store.summary_bytes, dtype, batch, kv_heads,
                                                        head_dim)[:count]
        return store

    # ------------------------------------------------------------------ contents

    @property
    def slots(self) -> int:
        return self._records.shape[0]

    def nbytes(self) -> int:
        """Bytes of the records (RAM or file), header excluded."""
        return self.slots * self.record_bytes

    def index_nbytes(self) -> int:
        """Bytes of the block index kept in RAM (summaries and flags), whatever the records' place."""
        return sum(t.numel() * t.element_size() for t in (self._index_summaries, self._has_entries))

    def _payload(self, offset: int, nbytes: int, dtype: torch.dtype, *shape: int) -> Tensor:
        """A typed view ``[slots, *shape]`` of one field of every record."""
        raw = self._records[:, _PREFIX_BYTES + offset: _PREFIX_BYTES + offset + nbytes]
        return raw.view(dtype).view(self.slots, *shape)

    def block_ids(self) -> Tensor:
        """``[count]``: the block id of every valid slot."""
        return self._records[: self.count, :8].view(torch.int64)[:, 0].clone()

    def positions(self) -> Tensor:
        """``[count, B, S]``: the positions of the entries of every valid slot (``-1``: empty)."""
        return self._payload(0, self.pos_bytes, torch.int64, self.batch, self.block_size)[: self.count]

    def summaries(self) -> Tensor:
        """``[count, B, Hkv, dh]``: the summary (mean key) of every valid slot (the RAM index)."""
        return self._index_summaries[: self.count]

    def has_entries(self) -> Tensor:
        """``[count, B]``: whether a slot holds a non-empty entry of sequence ``b``."""
        return self._has_entries[: self.count]

    def fetch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and positions of slots ``index [B, r]`` (row ``b`` reads its own
        sequence; ``-1`` reads slot 0, to be masked by the caller) -> ``k, v [B, r, S, Hkv, dh]``,
        ``pos [B, r, S]``."""
        shape = (self.batch, self.block_size, self.kv_heads, self.head_dim)
        rows = torch.arange(self.batch)[:, None]
        index = index.cpu().clamp(min=0)
        offset = self.pos_bytes + self.summary_bytes
        k = self._payload(offset, self.kv_bytes, self.dtype, *shape)[index, rows]
        v = self._payload(offset + self.kv_bytes, self.kv_bytes, self.dtype, *shape)[index, rows]
        pos = self._payload(0, self.pos_bytes, torch.int64, self.batch, self.block_size)[index, rows]
        return k, v, pos

    def append(self, block_id: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Write one block ``k, v [B, S, Hkv, dh]`` with the positions of its entries
        ``pos [B, S]`` (detached, cast to the store's dtype; empty entries, ``-1``, stored as zeros)."""
        if self.max_blocks is not None and self.written >= self.max_blocks and self.overflow == "error":
            raise StorageBudgetExceeded(
                f"the block store{'' if self.path is None else ' ' + str(self.path)} is full: {self.max_blocks} "
                f"blocks of {block_bytes(self.block_size, self.kv_heads, self.head_dim, self.itemsize)} bytes per "
                f"sequence fill storage_budget_bytes; raise the budget or use storage_overflow='evict'")
        slot = self.written % self.max_blocks if self.max_blocks is not None else self.written
        if slot >= self.slots:
            grown = max(_INITIAL_SLOTS, 2 * self.slots)
            self._grow(min(grown, self.max_blocks) if self.max_blocks is not None else grown)
        pos = pos.detach().cpu().long().expand(self.batch, self.block_size)
        empty = (pos < 0)[..., None, None]
        k = k.detach().cpu().to(self.dtype).masked_fill(empty, 0)
        v = v.detach().cpu().to(self.dtype).masked_fill(empty, 0)
        summary = block_summary(k, pos).to(self.dtype)  # [B, Hkv, dh]
        payload = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in (pos, summary, k, v)])
        record = self._records[slot]
        record[_PREFIX_BYTES: _PREFIX_BYTES + self.payload_bytes] = payload
        crc = zlib.crc32(payload.numpy()) if self.path is not None else 0
        record[:_PREFIX_BYTES].view(torch.int64).copy_(torch.tensor([block_id, crc]))
        self._has_entries[slot] = (pos >= 0).any(-1)
        self._index_summaries[slot] = summary
        self.written += 1
        self.count = min(self.written, self.max_blocks or self.written)
        if self._mmap is not None:
            self._write_header()

    def _grow(self, slots: int) -> None:
        extra = slots - self.slots
        self._has_entries = torch.cat([self._has_entries, torch.zeros(extra, self.batch, dtype=torch.bool)])
        self._index_summaries = torch.cat([self._index_summaries, self._index_summaries.new_zeros(
            extra, *self._index_summaries.shape[1:])])
        if self.path is not None:
            self._map(slots)
            return
        self._records = torch.cat([self._records, torch.zeros(extra, self.record_bytes, dtype=torch.uint8)])

    def flush(self) -> None:
        """Write the mapped pages of a disk store to its file."""
        if self._mmap is not None:
            self._mmap.flush()


def retrieve(store: BlockStore, queries: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoder side of :func:`retrieval_per_chunk` at one boundary: the ``r`` blocks of
    ``store`` that best match ``queries [B, C, H, dh]`` (the chunk just completed).

    Returns ``(ids [B, r], k, v [B, r·S, Hkv, dh], pos [B, r·S])`` on the device of ``queries``;
    an empty block has id ``-1`` and positions ``-1``."""
    b, device = queries.shape[0], queries.device
    flat = (b, r * store.block_size, store.kv_heads, store.head_dim)
    if store.count == 0:
        empty = torch.full((b, r), -1, dtype=torch.long, device=device)
        zeros = queries.new_zeros(flat, dtype=store.dtype)
        return empty, zeros, zeros.clone(), torch.full(flat[:2], -1, dtype=torch.long, device=device)
    scores = block_match_scores(queries, store.summaries().to(device).transpose(0, 1))  # [B, m]
    scores = scores.masked_fill(~store.has_entries().to(device).T, float("-inf"))
    index, block = select_blocks(scores, store.block_ids().to(device).expand_as(scores), r)
    k, v, pos = store.fetch(index)
    pos = pos.to(device).masked_fill(block[..., None] < 0, -1).reshape(flat[:2])
    return block.to(device), k.reshape(flat).to(device), v.reshape(flat).to(device), pos


def store_file_name(layer: int) -> str:
    """The file of layer ``layer``'s store in a storage directory."""
    return f"layer{layer:03d}.bmojo-store"


__all__ = [
    "OVERFLOW_POLICIES",
    "STORAGE_SOURCES",
    "BlockStore",
    "StorageBudgetExceeded",
    "block_bytes",
    "block_match_scores",
    "block_summary",
    "capacity_from_budget",
    "entry_positions",
    "evicted_block_count",
    "gather_positions",
    "raw_block_positions",
    "retrieval_per_chunk",
    "retrieve",
    "select_blocks",
    "store_file_name",
    "stored_block_count",
]
