"""Peak memory of one run of a function: the most bytes its tensors held at once, beyond what was
held when it started.

- **CUDA**: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, minus
  ``torch.cuda.memory_allocated`` at the start: bytes handed out by PyTorch's CUDA caching allocator
  (not the blocks it keeps reserved, not the CUDA context).
- **CPU**: PyTorch keeps no allocation statistics for the CPU, and the process's peak RSS
  (``resource.getrusage``) only ever grows, so it cannot give one run's peak. The run is executed
  under ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
  made through PyTorch's CPU allocator with its size and time; the peak is the maximum of their
  running sum. It counts every tensor (activations, gradients, temporaries, kernel workspaces
  allocated as tensors); it misses memory allocated outside PyTorch's allocator (oneDNN's private
  scratch buffers, Python objects). The profiled run is slower, so it is never a timed run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

# Kineto, the profiler's backend, logs two lines to stderr per profiling session unless its log
# level is raised; a user's own setting is kept.
KINETO_QUIET_LOG_LEVEL = "6"


def peak_memory_measure(device: torch.device) -> str:
    """What :func:`peak_bytes` measures on ``device``, in one line (for tables and JSON documents)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step, minus what was allocated before it"
    return "peak of the bytes allocated through PyTorch's CPU allocator during one step (torch.profiler)"


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by tensors during ``fn()`` beyond those held when it started (module docstring)."""
    if device.type == "cuda":
        return _peak_bytes_cuda(fn, device)
    if device.type == "cpu":
        return _peak_bytes_cpu(fn)
    raise ValueError(f"peak memory is measured on cpu and cuda devices only, not {device}")


def _peak_bytes_cuda(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _peak_bytes_cpu(fn: Callable[[], object]) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LOG_LEVEL)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []  # (time ns, bytes: > 0 allocated, < 0 freed)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return allocation_peak(events)


def allocation_peak(events: list[tuple[int, int]]) -> int:
    """Maximum running sum of ``(time, bytes)`` allocation (> 0) and free (< 0) events taken in time
    order, from 0 at the start (freeing what existed before the run only lowers the sum)."""
    running = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        running += size
        peak = max(peak, running)
    return peak
