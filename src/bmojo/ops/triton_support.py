"""Triton as the kernels of :mod:`bmojo.ops.attention_triton` and :mod:`bmojo.ops.ssd_triton`
need it: installed, at a version they run with."""

from __future__ import annotations

import re
from types import ModuleType

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
