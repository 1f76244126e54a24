"""Innovation test, per-chunk selection and eidetic memory contents (DESIGN.md §4).

Everything here works on positions and scores only (no keys or values): the layer gathers
the keys and values of the chosen positions, so gradients flow through the selected
tokens' ``k, v`` and nowhere else (selection is a hard choice).

Conventions:

- an **empty** entry has position ``-1`` and score ``-inf``;
- entries are **ranked** by score, descending, ties broken by the earlier position;
- ``selection`` decides the score each position competes with: ``"topk"`` the innovation
  ``s_t``; ``"random"`` a seeded hash of the position (uniform in ``[0, 1)``, the same for
  every batch row); ``"recent"`` the position itself (the chunk's last ``k`` win).
  ``innovation_threshold`` (``"topk"`` only) empties a selected slot whose score is ``<= τ``.

Two ways to compute the memory visible to each chunk:

- :func:`eidetic_memory_sequential`: the reference, a loop over chunks applying
  :func:`eidetic_memory_update`, the very function the decoder applies when a chunk ends;
- :func:`eidetic_memory_per_chunk`: the vectorised fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

POLICIES = ("fifo", "score")
SELECTIONS = ("topk", "random", "recent")


def innovation_scores(x: Tensor, x_hat: Tensor) -> Tensor:
    """``s_t = ||x_t - x̂_t||² / D`` in float32. ``x, x_hat [..., D]`` -> ``[...]``."""
    return (x.float() - x_hat.float()).pow(2).mean(dim=-1)


def selection_scores(innovation: Tensor, positions: Tensor, selection: str, seed: int = 0) -> Tensor:
    """The score each position competes with inside its chunk (see module docstring).
    ``innovation [b, l]``, ``positions [l]`` -> ``[b, l]`` float32."""
    if selection == "topk":
        return innovation.float()
    if selection == "random":
        # Deterministic hash of (position, seed), computed in float64: the decoder computes
        # the same value for the same position, whatever the chunking.
        u = torch.sin(positions.double() * 12.9898 + (seed + 1) * 78.233) * 43758.5453
        return (u - torch.floor(u)).float().expand_as(innovation)
    if selection == "recent":
        return positions.float().expand_as(innovation)
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def rank_order(score: Tensor, pos: Tensor) -> Tensor:
    """Permutation (along the last dim) sorting entries by score descending, then position
    ascending. Empty entries (score ``-inf``) come last."""
    by_pos = torch.argsort(pos, dim=-1, stable=True)
    by_score = torch.argsort(-score.gather(-1, by_pos), dim=-1, stable=True)
    return by_pos.gather(-1, by_score)


def top_ranked(score: Tensor, pos: Tensor, k: int) -> Tensor:
    """``rank_order(score, pos)[..., :k]`` (entries with position ``< 2**31 - 1``, no NaN) in
    ``O(n)``: one ``topk`` on an int64 key that orders exactly as the ranking does, the
    float32 score's bits made order-preserving in the high half and ``2**31 - 1 - pos`` in
    the low half. For rankings of many entries (a block store's), where two stable sorts
    cost ``O(n log n)``."""
    bits = (score.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie as floats
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # increasing with the score
    key = (ordered << 32) + (2**31 - 1 - pos.long())  # larger = better: higher score, then earlier position
    return key.topk(min(k, key.shape[-1]), dim=-1).indices


def select_per_chunk(
    score: Tensor, chunk_size: int, k: int, threshold: float | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` best positions of every **complete** chunk.

    ``score [b, l]`` -> ``(sel_pos [b, nc, k], sel_score [b, nc, k])`` with
    ``nc = l // chunk_size``, entries in rank order; empty where the score is ``<= threshold``.
    """
    b, l = score.shape
    nc = l // chunk_size
    s = score[:, : nc * chunk_size].reshape(b, nc, chunk_size)
    pos = torch.arange(nc * chunk_size, device=score.device).view(1, nc, chunk_size).expand(b, nc, chunk_size)
    order = rank_order(s, pos)[..., :k]
    sel_score, sel_pos = s.gather(-1, order), pos.gather(-1, order)
    if threshold is not None:
        empty = sel_score <= threshold
        sel_score = sel_score.masked_fill(empty, float("-inf"))
        sel_pos = sel_pos.masked_fill(empty, -1)
    return sel_pos, sel_score


def eidetic_memory_update(
    mem_pos: Tensor, mem_score: Tensor, new_pos: Tensor, new_score: Tensor, policy: str
) -> Tensor:
    """The memory after one chunk's selections arrive.

    ``mem_* [b, M]`` (oldest first for ``"fifo"``, rank order for ``"score"``) and
    ``new_* [b, k]`` -> index ``[b, M]`` into the concatenation ``[mem ; new]`` (``M + k``
    entries) giving the new memory. ``"fifo"`` drops the oldest ``k`` entries; ``"score"``
    keeps the ``M`` best ranked.
    """
    b, m = mem_pos.shape
    k = new_pos.shape[1]
    if policy == "fifo":
        return torch.arange(k, k + m, device=mem_pos.device).expand(b, m)
    if policy == "score":
        return rank_order(torch.cat([mem_score, new_score], 1), torch.cat([mem_pos, new_pos], 1))[:, :m]
    raise ValueError(f"eidetic policy must be one of {POLICIES}, got {policy!r}")


def eidetic_memory_dropped(all_pos: Tensor, all_score: Tensor, keep: Tensor, k: int) -> Tensor:
    """The ``k`` entries one chunk's update drops (DESIGN.md §5: what leaves the memory for the
    store): ``all_* [b, M + k]`` the concatenation ``[mem ; new]``, ``keep [b, M]`` the index
    :func:`eidetic_memory_update` returned -> index ``[b, k]`` into it of the entries not kept,
    ranked (score descending, then position; empty entries last)."""
    kept = torch.zeros_like(all_pos, dtype=torch.bool).scatter_(1, keep, True)
    # Kept entries rank below every dropped one, empty ones included (position -1 < int64 max).
    last = torch.iinfo(all_pos.dtype).max
    return rank_order(all_score.masked_fill(kept, float("-inf")), all_pos.masked_fill(kept, last))[:, :k]


def eidetic_dropped_per_chunk(sel_pos: Tensor, sel_score: Tensor, mem_pos: Tensor, mem_score: Tensor
                              ) -> tuple[Tensor, Tensor]:
    """Parallel form of :func:`eidetic_memory_dropped` at every boundary: ``sel_* [b, nc, k]`` and
    the memory ``mem_* [b, nc + 1, M]`` each chunk sees -> ``(pos, score) [b, nc, k]``, entry ``c``
    the entries dropped when chunk ``c`` completes, ranked, empty ones as ``(-1, -inf)``."""
    union_pos = torch.cat([mem_pos[:, :-1], sel_pos], -1)  # [b, nc, M + k]
    union_score = torch.cat([mem_score[:, :-1], sel_score], -1)
    kept = (union_pos[..., None] == mem_pos[:, 1:, None, :]).any(-1) | (union_pos < 0)  # [b, nc, M + k]
    pos, score = union_pos.masked_fill(kept, -1), union_score.masked_fill(kept, float("-inf"))
    order = rank_order(score, pos)[..., : sel_pos.shape[-1]]
    return pos.gather(-1, order), score.gather(-1, order)


def empty_memory(batch: int, capacity: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(pos [b, M] = -1, score [b, M] = -inf)``."""
    return (
        torch.full((batch, capacity), -1, dtype=torch.long, device=device),
        torch.full((batch, capacity), float("-inf"), device=device),
    )


def eidetic_memory_sequential(
    sel_pos: Tensor, sel_score: Tensor, capacity: int, policy: str,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: memory visible to each chunk, by folding :func:`eidetic_memory_update`.

    ``sel_* [b, nc, k]`` -> ``(mem_pos, mem_score)`` of shape ``[b, nc + 1, M]``; entry ``c``
    is the memory after chunks ``0 .. c-1`` completed (what chunk ``c`` sees). ``initial``
    (``pos, score [b, M]``, default empty) is the memory before chunk ``0``: a decoder's
    memory when a sequence continues (DESIGN.md §7).
    """
    if policy not in POLICIES:
        raise ValueError(f"eidetic policy must be one of {POLICIES}, got {policy!r}")
    b, nc, _ = sel_pos.shape
    pos, score = empty_memory(b, capacity, sel_pos.device) if initial is None else initial
    out_pos, out_score = [pos], [score]
    for c in range(nc):
        idx = eidetic_memory_update(pos, score, sel_pos[:, c], sel_score[:, c], policy)
        pos = torch.cat([pos, sel_pos[:, c]], 1).gather(1, idx)
        score = torch.cat([score, sel_score[:, c]], 1).gather(1, idx)
        out_pos.append(pos)
        out_score.append(score)
    return torch.stack(out_pos, 1), torch.stack(out_score, 1)


def eidetic_memory_per_chunk(
    sel_pos: Tensor, sel_score: Tensor, capacity: int, policy: str,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast path of :func:`eidetic_memory_sequential`, same arguments, result and slot order.

    ``"fifo"``: chunk ``c`` sees the selections of chunks ``c - M/k .. c-1`` (a sliding
    window over chunks; the ``initial`` memory, oldest first, is the selections of the
    ``M/k`` chunks before chunk ``0``). ``"score"``: chunk ``c`` sees the ``M`` best ranked
    entries of the initial memory and the selections of chunks ``< c`` (all chunks at once,
    ``O(nc² k)`` memory, fine for ``nc`` in the hundreds).
    """
    if policy not in POLICIES:
        raise ValueError(f"eidetic policy must be one of {POLICIES}, got {policy!r}")
    b, nc, k = sel_pos.shape
    if capacity == 0:
        return sel_pos.new_full((b, nc + 1, 0), -1), sel_score.new_full((b, nc + 1, 0), float("-inf"))
    init_pos, init_score = empty_memory(b, capacity, sel_pos.device) if initial is None else initial  # [b, M]
    if policy == "fifo":
        history = capacity // k
        pos = torch.cat([init_pos.view(b, history, k), sel_pos], 1)  # [b, history + nc, k]
        score = torch.cat([init_score.view(b, history, k), sel_score], 1)
        windows = torch.arange(nc + 1, device=sel_pos.device)[:, None] + torch.arange(history, device=sel_pos.device)
        return pos[:, windows].reshape(b, nc + 1, capacity), score[:, windows].reshape(b, nc + 1, capacity)
    # policy == "score": the initial entries are seen by every chunk
    flat_pos = torch.cat([init_pos, sel_pos.reshape(b, nc * k)], 1)[:, None]  # [b, 1, M + nc*k]
    flat_score = torch.cat([init_score, sel_score.reshape(b, nc * k)], 1)[:, None]
    entry_chunk = torch.cat([torch.full((capacity,), -1, device=sel_pos.device),
                             torch.arange(nc, device=sel_pos.device).repeat_interleave(k)])  # [M + nc*k]
    seen = entry_chunk[None, :] < torch.arange(nc + 1, device=sel_pos.device)[:, None]  # [nc+1, M + nc*k]
    pos = torch.where(seen, flat_pos, -1)  # [b, nc+1, M + nc*k]
    score = torch.where(seen, flat_score, float("-inf"))
    order = rank_order(score, pos)[..., :capacity]
    return pos.gather(-1, order), score.gather(-1, order)
