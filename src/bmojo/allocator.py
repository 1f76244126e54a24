"""Reuse of large CPU tensor buffers between training steps (glibc malloc).

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves a request above its mmap
threshold (128 KiB, raised as blocks are freed, never above 32 MiB) with a fresh ``mmap`` and
unmaps it on ``free``, so each step's large activations and score buffers are page-faulted in
again on first touch: at L = 8192 a 42 MB attention score buffer spent about 30 ms of a 57 ms
``bmm`` faulting its pages (docs/performance.md). :func:`keep_freed_memory` turns that off for
the process (``mallopt(M_MMAP_MAX, 0)`` and a 2 GiB trim threshold): large blocks come from the
heap and stay there for the next step, as with jemalloc or tcmalloc, which PyTorch's CPU
performance guide recommends. The price is that the process keeps up to 2 GiB of freed memory.

The ``bmojo`` command line applies it before every command but ``bench context``, which measures
the process's memory and would count the kept blocks (:func:`bmojo.cli.main`). A user who chose
an allocator (``LD_PRELOAD``) or set glibc's own ``MALLOC_*`` variables keeps it,
``BMOJO_ALLOCATOR=system`` leaves malloc as it is, and :data:`STATUS` says which happened.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: free heap tops below 2 GiB are kept

OPT_OUT_VARIABLE = "BMOJO_ALLOCATOR"

STATUS = "system allocator, unchanged"


def keep_freed_memory(environ: dict[str, str] | None = None) -> str:
    """Make glibc keep freed large blocks for reuse (module docstring); returns and stores in
    :data:`STATUS` one line saying what the process's allocator now is."""
    global STATUS
    environ = os.environ if environ is None else environ
    libc, _ = platform.libc_ver()
    if environ.get(OPT_OUT_VARIABLE) == "system":
        STATUS = f"system allocator, unchanged ({OPT_OUT_VARIABLE}=system)"
    elif environ.get("LD_PRELOAD"):
        STATUS = f"preloaded allocator ({environ['LD_PRELOAD']}), unchanged"
    elif any(name.startswith("MALLOC_") for name in environ):
        STATUS = "glibc malloc with the user's MALLOC_* settings, unchanged"
    elif libc != "glibc":
        STATUS = "system allocator (not glibc), unchanged"
    else:
        c_library = ctypes.CDLL(None)
        if c_library.mallopt(M_MMAP_MAX, 0) != 1 or c_library.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
            raise OSError("glibc mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
        STATUS = "glibc malloc keeping freed blocks (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return STATUS
