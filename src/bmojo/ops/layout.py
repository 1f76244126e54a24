"""Memory layout helpers shared by the ops."""

from __future__ import annotations

import torch
from torch import Tensor


def contiguous_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` and contiguous, with at most one copy.

    ``t.to(dtype).contiguous()`` copies twice when both change (the cast keeps a strided
    layout); ``t.to(dtype, memory_format=contiguous_format)`` casts and lays out in one copy,
    but returns a strided ``t`` unchanged when ``dtype`` is already its dtype, hence the
    ``contiguous()`` after it (then the only copy). A batched matmul copies a strided operand
    itself, once per use, so ops that use a strided slice or permutation more than once, or
    cast it anyway, make it contiguous here first.
    """
    return t.to(dtype, memory_format=torch.contiguous_format).contiguous()
