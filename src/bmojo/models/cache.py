"""The decoding cache of a whole model: one fixed-size cache per layer (DESIGN.md §7)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


@dataclass
class ModelCache:
    """Per-layer caches (:class:`~bmojo.layers.KVBuffer`, :class:`~bmojo.layers.Mamba2Cache`
    or :class:`~bmojo.layers.BMojoCache`) and the number of tokens seen so far."""

    layers: list[Any]
    batch_size: int
    position: int = 0

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (what a decoder keeps for ``batch_size`` sequences)."""
        return sum(_tensor_bytes(layer) for layer in self.layers)
