"""Long-term eidetic memory in storage (DESIGN.md §5): block retrieval and the block store.

**What is stored.** The raw keys/values older than the window, cut into position-aligned
blocks of ``S`` tokens: block ``b`` holds positions ``[b·S, (b+1)·S)``, keys in the eidetic
memory's representation (unrotated for ``eidetic_rope="none"``). Its **summary** is the mean
key of the block (per key head).

**When.** Writes and reads happen at chunk boundaries only (asynchronous update). At the
boundary before query chunk ``n`` (position ``n·C``) the store holds every block whose
positions are all ``<= n·C - W - F`` (:func:`stored_block_count`), so a retrieved key never
duplicates a raw-window key or a fading token's range, and is visible to every query ``i``
of the chunk (``t <= i - W``).

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


class StorageBudgetExceeded(ValueError):
    """The store of a layer is full and its overflow policy is ``"error"``."""


def stored_block_count(n: int, window: int, fading_span: int, chunk_size: int, block_size: int) -> int:
    """Blocks written to the store at the boundary before query chunk ``n``: those whose last
    position ``(b+1)·S - 1`` is ``<= n·C - W - F``."""
    return max(0, (n * chunk_size - window - fading_span + 1) // block_size)


def block_bytes(block_size: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one block takes per sequence: keys, values and the summary."""
    return (2 * block_size + 1) * kv_heads * head_dim * itemsize


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


def block_positions(block_ids: Tensor, block_size: int) -> Tensor:
    """Positions of the tokens of blocks ``[..., r]`` -> ``[..., r·S]`` (``-1`` for an empty block)."""
    offsets = torch.arange(block_size, device=block_ids.device)
    pos = block_ids[..., None] * block_size + offsets  # [..., r, S]
    return pos.masked_fill(block_ids[..., None] < 0, -1).flatten(-2)


def retrieval_per_chunk(q_mem: Tensor, k_mem: Tensor, r: int, window: int, fading_span: int, chunk_size: int,
                        block_size: int, max_blocks: int | None, overflow: str) -> Tensor:
    """Parallel path: the blocks each query chunk ``n = 0 .. L//C`` retrieves, ``[B, L//C + 1, r]``.

    ``q_mem [B, L, H, dh]`` (eidetic queries), ``k_mem [B, L, Hkv, dh]`` (keys as stored). Entry
    ``n`` is what chunk ``n`` sees (the last entry is for the chunk after a sequence that ends
    on a chunk boundary, which a prefilled cache needs). Same result as a decoder applying
    :func:`select_blocks` to its :class:`BlockStore` at every boundary.
    """
    b, length = q_mem.shape[:2]
    C, S = chunk_size, block_size
    nc = length // C
    blocks = torch.full((b, nc + 1, r), -1, dtype=torch.long, device=q_mem.device)
    counts = [stored_block_count(n, window, fading_span, C, S) for n in range(1, nc + 1)]
    total = counts[-1] if counts else 0
    if max_blocks is not None and overflow == "error" and total > max_blocks:
        raise StorageBudgetExceeded(f"{length} tokens write {total} blocks to the store of a layer, more than its "
                                    f"budget of {max_blocks} blocks (storage_overflow='error')")
    if total == 0:
        return blocks
    summary = k_mem[:, : total * S].float().unflatten(1, (total, S)).mean(2)  # [B, m, Hkv, dh]
    queries = q_mem[:, : nc * C].unflatten(1, (nc, C))  # [B, nc, C, H, dh]: chunk c = n - 1
    scores = block_match_scores(queries, summary)  # [B, nc, m]
    ids = torch.arange(total, device=q_mem.device)
    count = torch.tensor(counts, device=q_mem.device)[:, None]  # [nc, 1]
    available = ids < count
    if max_blocks is not None:
        available &= ids >= count - max_blocks  # "evict": the oldest are gone
    scores = scores.masked_fill(~available, float("-inf"))
    _, blocks[:, 1:] = select_blocks(scores, ids.expand_as(scores), r)
    return blocks


_MAGIC = b"BMOJOSTO"
_VERSION = 1
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
    (int64) | summary [B, Hkv, dh] | k [B, S, Hkv, dh] | v [B, S, Hkv, dh]]`` in ``dtype``.

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
        self.summary_bytes = batch * kv_heads * head_dim * self.itemsize
        self.kv_bytes = batch * block_size * kv_heads * head_dim * self.itemsize
        self.payload_bytes = self.summary_bytes + 2 * self.kv_bytes
        self.record_bytes = -(-(_PREFIX_BYTES + self.payload_bytes) // 8) * 8  # 8-byte aligned records
        self.count = 0  # valid slots
        self.written = 0  # blocks appended so far, evicted ones included
        self._mmap = None
        self._records = torch.zeros(0, self.record_bytes, dtype=torch.uint8)
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
        return store

    # ------------------------------------------------------------------ contents

    @property
    def slots(self) -> int:
        return self._records.shape[0]

    def nbytes(self) -> int:
        """Bytes of the records (RAM or file), header excluded."""
        return self.slots * self.record_bytes

    def _payload(self, offset: int, nbytes: int, *shape: int) -> Tensor:
        """A typed view ``[slots, *shape]`` of one field of every record."""
        raw = self._records[:, _PREFIX_BYTES + offset: _PREFIX_BYTES + offset + nbytes]
        return raw.view(self.dtype).view(self.slots, *shape)

    def block_ids(self) -> Tensor:
        """``[count]``: the block id of every valid slot."""
        return self._records[: self.count, :8].view(torch.int64)[:, 0].clone()

    def summaries(self) -> Tensor:
        """``[count, B, Hkv, dh]``: the summary (mean key) of every valid slot."""
        return self._payload(0, self.summary_bytes, self.batch, self.kv_heads, self.head_dim)[: self.count]

    def fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of slots ``index [B, r]`` (row ``b`` reads its own sequence; ``-1``
        reads slot 0, to be masked by the caller) -> ``k, v [B, r, S, Hkv, dh]``."""
        shape = (self.batch, self.block_size, self.kv_heads, self.head_dim)
        rows = torch.arange(self.batch)[:, None]
        index = index.cpu().clamp(min=0)
        k = self._payload(self.summary_bytes, self.kv_bytes, *shape)[index, rows]
        v = self._payload(self.summary_bytes + self.kv_bytes, self.kv_bytes, *shape)[index, rows]
        return k, v

    def append(self, block_id: int, k: Tensor, v: Tensor) -> None:
        """Write one block ``k, v [B, S, Hkv, dh]`` (detached, cast to the store's dtype)."""
        if self.max_blocks is not None and self.written >= self.max_blocks and self.overflow == "error":
            raise StorageBudgetExceeded(
                f"the block store{'' if self.path is None else ' ' + str(self.path)} is full: {self.max_blocks} "
                f"blocks of {block_bytes(self.block_size, self.kv_heads, self.head_dim, self.itemsize)} bytes per "
                f"sequence fill storage_budget_bytes; raise the budget or use storage_overflow='evict'")
        slot = self.written % self.max_blocks if self.max_blocks is not None else self.written
        if slot >= self.slots:
            grown = max(_INITIAL_SLOTS, 2 * self.slots)
            self._grow(min(grown, self.max_blocks) if self.max_blocks is not None else grown)
        k, v = k.detach().cpu().to(self.dtype), v.detach().cpu().to(self.dtype)
        summary = k.float().mean(1).to(self.dtype)  # [B, Hkv, dh]
        payload = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in (summary, k, v)])
        record = self._records[slot]
        record[_PREFIX_BYTES: _PREFIX_BYTES + self.payload_bytes] = payload
        crc = zlib.crc32(payload.numpy()) if self.path is not None else 0
        record[:_PREFIX_BYTES].view(torch.int64).copy_(torch.tensor([block_id, crc]))
        self.written += 1
        self.count = min(self.written, self.max_blocks or self.written)
        if self._mmap is not None:
            self._write_header()

    def _grow(self, slots: int) -> None:
        if self.path is not None:
            self._map(slots)
            return
        extra = torch.zeros(slots - self.slots, self.record_bytes, dtype=torch.uint8)
        self._records = torch.cat([self._records, extra])

    def flush(self) -> None:
        """Write the mapped pages of a disk store to its file."""
        if self._mmap is not None:
            self._mmap.flush()


def retrieve(store: BlockStore, queries: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder side of :func:`retrieval_per_chunk` at one boundary: the ``r`` blocks of
    ``store`` that best match ``queries [B, C, H, dh]`` (the chunk just completed).

    Returns ``(ids [B, r], k, v [B, r·S, Hkv, dh])`` on the device of ``queries``; empty blocks
    have id ``-1`` (their keys are zeros from slot 0 and must be masked by position)."""
    b = queries.shape[0]
    flat = (b, r * store.block_size, store.kv_heads, store.head_dim)
    if store.count == 0:
        empty = torch.full((b, r), -1, dtype=torch.long, device=queries.device)
        zeros = queries.new_zeros(flat, dtype=store.dtype)
        return empty, zeros, zeros.clone()
    scores = block_match_scores(queries, store.summaries().to(queries.device).transpose(0, 1))  # [B, m]
    index, block = select_blocks(scores, store.block_ids().to(queries.device).expand_as(scores), r)
    k, v = store.fetch(index)
    return block.to(queries.device), k.reshape(flat).to(queries.device), v.reshape(flat).to(queries.device)


def store_file_name(layer: int) -> str:
    """The file of layer ``layer``'s store in a storage directory."""
    return f"layer{layer:03d}.bmojo-store"


__all__ = [
    "OVERFLOW_POLICIES",
    "BlockStore",
    "StorageBudgetExceeded",
    "block_bytes",
    "block_match_scores",
    "block_positions",
    "capacity_from_budget",
    "retrieval_per_chunk",
    "retrieve",
    "select_blocks",
    "store_file_name",
    "stored_block_count",
]
