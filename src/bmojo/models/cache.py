"""The decoding cache of a whole model: one fixed-size cache per layer (DESIGN.md §7), plus,
for layers with storage, a block store that lives outside the fixed-size state (§5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bmojo.layers.kv_buffer import KVBuffer
from bmojo.ops.storage import BlockStore


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _state(obj: Any) -> Any:
    """Tensors, numbers and flags of a (nested) layer cache; block stores are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _state(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not isinstance(getattr(obj, f.name), BlockStore)}
    return obj


def _load(obj: Any, state: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(obj) if not isinstance(getattr(obj, f.name), BlockStore)}
    if set(state) != names:
        raise ValueError(f"saved cache does not match this model at {where}: fields {sorted(state)}, "
                         f"expected {sorted(names)}")
    resizable = isinstance(obj, KVBuffer) and obj.growable  # a full-attention buffer's capacity grows
    for name, value in state.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _load(current, value, f"{where}.{name}")
            continue
        if isinstance(current, Tensor) and not resizable and getattr(value, "shape", None) != current.shape:
            # e.g. another window or fading span: ring slots are positions mod their size
            saved = tuple(value.shape) if isinstance(value, Tensor) else value
            raise ValueError(f"saved cache does not match this model at {where}.{name}: {saved}, "
                             f"expected shape {tuple(current.shape)}")
        setattr(obj, name, value)


@dataclass
class ModelCache:
    """Per-layer caches (:class:`~bmojo.layers.KVBuffer`, :class:`~bmojo.layers.Mamba2Cache`
    or :class:`~bmojo.layers.BMojoCache`) and the number of tokens seen so far."""

    layers: list[Any]
    batch_size: int
    position: int = 0
    dtype: torch.dtype = torch.float32  # of the keys and values (set by LanguageModel.new_cache)

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (what a decoder keeps for ``batch_size`` sequences);
        block stores are not counted (see :meth:`store_nbytes`)."""
        return sum(_tensor_bytes(layer) for layer in self.layers)

    def stores(self) -> list[BlockStore]:
        """The block stores of the layers that have one."""
        return [layer.store for layer in self.layers if isinstance(getattr(layer, "store", None), BlockStore)]

    def store_nbytes(self) -> int:
        """Bytes of the block stores (RAM or disk), the only part that grows with the context."""
        return sum(store.nbytes() for store in self.stores())

    def save(self, path: str | Path) -> None:
        """Write the cache's tensors to ``path`` (``torch.save``) and flush the disk block
        stores, so that :meth:`bmojo.LanguageModel.load_cache` resumes the decode. A cache with
        stores in RAM cannot be saved: decode with ``storage_dir`` to resume later."""
        stores = self.stores()
        if any(store.path is None for store in stores):
            raise ValueError("this cache keeps its block stores in RAM, which are not saved: create it with "
                             "new_cache(..., storage_dir=DIR) to save and resume a decode")
        for store in stores:
            store.flush()
        torch.save({"batch_size": self.batch_size, "position": self.position,
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "layers": [_state(layer) for layer in self.layers]}, path)

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace this cache's tensors by those of a saved state (same model)."""
        if state["batch_size"] != self.batch_size or len(state["layers"]) != len(self.layers):
            raise ValueError(f"saved cache holds {state['batch_size']} sequences and {len(state['layers'])} layers, "
                             f"this one {self.batch_size} and {len(self.layers)}")
        for index, (layer, layer_state) in enumerate(zip(self.layers, state["layers"], strict=True)):
            _load(layer, layer_state, f"layer {index}")
        self.position = state["position"]

