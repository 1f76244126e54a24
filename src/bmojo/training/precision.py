"""Which precision a run trains and evaluates in: ``fp32``, ``bf16`` (autocast, fp32 master
weights) or ``auto``, which picks bf16 only where it is fast.

bf16 is not fast everywhere. A CPU without native bf16 instructions (no AVX512-BF16 or AMX)
emulates bf16 matmuls: on the project's 2-core CI machine (AVX-512F only) a bf16 matmul runs
at ~46 GFLOP/s against ~190 GFLOP/s in fp32, and a laptop-size language model trains 2.6–4×
slower under bf16 autocast. ``auto`` therefore measures rather than guesses: on CPU it times
one bf16 and one fp32 matmul (a few milliseconds, once per process) and takes bf16 only if it
is faster; on CUDA it takes bf16 where the GPU supports it. The choice and its reason are
returned so that callers can say which path ran.
"""

from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("auto", "bf16", "fp32")
_PROBE_SIZE = 512  # large enough that the matmul kernel, not dispatch, dominates


def _matmul_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up: kernel selection and packing buffers
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """Measured bf16 matmul throughput on this CPU as a multiple of fp32 (> 1: bf16 is faster)."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """``(precision that runs, why)`` for a requested ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    if precision != "auto":
        return precision, "requested"
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return ("bf16", "auto: this GPU supports bf16") if supported else ("fp32", "auto: this GPU has no bf16")
    if device.type == "cpu":
        speedup = cpu_bf16_speedup()
        chosen = "bf16" if speedup > 1.0 else "fp32"
        return chosen, f"auto: a bf16 matmul measured {speedup:.2f}x the fp32 speed on this CPU"
    return "fp32", f"auto: fp32 on {device.type}"
