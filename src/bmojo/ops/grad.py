"""Whether a fast path's autograd Function is needed at all."""

from __future__ import annotations

import torch
from torch import Tensor


def records_graph(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors``: grad mode on and one of them requires grad.
    Without it (inference, decoding) a Function's bookkeeping is only overhead: a few microseconds
    a call, next to the few elementwise ops of a norm on one token."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
