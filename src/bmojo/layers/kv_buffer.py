"""Key/value buffers of the decoding caches (DESIGN.md §7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVBuffer:
    """Keys and values indexed by absolute position.

    A **ring** (``growable=False``) of ``S`` slots keeps the last ``S`` positions
    (slot = position mod S) and never grows; a **growable** buffer (full attention) keeps
    every position and doubles its capacity when full. Empty slots have position ``-1``.
    """

    k: Tensor  # [B, S, hkv, dh]
    v: Tensor  # [B, S, hkv, dh]
    pos: Tensor  # [S], long
    growable: bool = False

    @classmethod
    def empty(cls, batch: int, slots: int, heads: int, head_dim: int, growable: bool, device, dtype) -> KVBuffer:
        return cls(
            k=torch.zeros(batch, slots, heads, head_dim, device=device, dtype=dtype),
            v=torch.zeros(batch, slots, heads, head_dim, device=device, dtype=dtype),
            pos=torch.full((slots,), -1, dtype=torch.long, device=device),
            growable=growable,
        )

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.pos.shape[0], 1)
        extra = capacity - self.pos.shape[0]
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], extra, *self.k.shape[2:])], 1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], extra, *self.v.shape[2:])], 1)
        self.pos = torch.cat([self.pos, self.pos.new_full((extra,), -1)])

    def write(self, k: Tensor, v: Tensor, start: int) -> None:
        """Store ``k, v [B, n, hkv, dh]`` at positions ``start .. start + n - 1`` (detached: a
        cache holds values, never an autograd graph)."""
        n = k.shape[1]
        if n == 0:
            return
        if self.growable and start + n > self.pos.shape[0]:
            self._grow(start + n)
        slots = self.pos.shape[0]
        keep = min(n, slots)
        positions = torch.arange(start + n - keep, start + n, device=self.pos.device)
        first = (start + n - keep) % slots
        # Slots first .. first+keep-1 when they do not wrap (a decoding step always): plain slices,
        # no index tensor; else the slots of positions mod S.
        index = slice(first, first + keep) if first + keep <= slots else positions % slots
        self.k[:, index] = k[:, n - keep:].detach().to(self.k.dtype)
        self.v[:, index] = v[:, n - keep:].detach().to(self.v.dtype)
        self.pos[index] = positions

    def clear(self) -> None:
        """Forget every position (the buffer keeps its size)."""
        self.pos.fill_(-1)

    def read(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``start .. end-1`` in position order, ``[B, end-start,
        hkv, dh]``; zeros for a position the buffer does not hold (not written, or overwritten)."""
        positions = torch.arange(start, end, device=self.pos.device)
        slots = positions % self.pos.shape[0]
        held = (self.pos[slots] == positions)[None, :, None, None]
        return torch.where(held, self.k[:, slots], 0), torch.where(held, self.v[:, slots], 0)
