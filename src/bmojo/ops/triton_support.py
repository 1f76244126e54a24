"""What the kernels of :mod:`bmojo.ops.attention_triton` and :mod:`bmojo.ops.ssd_triton` share:
triton installed at a version they run with, and their operators' tensor layout (contiguous in,
contiguous out)."""

from __future__ import annotations

import re
from types import ModuleType

from torch import Tensor

MIN_TRITON = (3, 4)  # triton.knobs (the interpreter setting the kernels read) is new in 3.4; tested with 3.9


def require_triton(user: str) -> ModuleType:
    """The ``triton`` module, or an ``ImportError`` saying what ``user`` needs: triton installed,
    at :data:`MIN_TRITON` or later."""
    try:
        import triton
    except ImportError as err:  # the CPU build of torch comes without triton
        raise ImportError(f"triton is not installed (for {user}: `pip install triton`; CUDA builds of torch "
                          f"install it)") from err
    found = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if found < MIN_TRITON:
        raise ImportError(f"triton {triton.__version__} is too old for {user}: it needs "
                          f">= {'.'.join(map(str, MIN_TRITON))}")
    return triton


def contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` laid out as the kernels index them (``None`` kept: an absent input)."""
    return [None if t is None else t.contiguous() for t in tensors]


def dense_like(t: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``t``'s shape, dtype and device: an operator's output
    as its fake implementation describes it."""
    return t.new_empty(t.shape)
