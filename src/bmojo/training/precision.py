"""Which precision a run trains and evaluates in: ``fp32``, ``bf16`` (autocast, fp32 master
weights) or ``auto``, which picks bf16 only where it is fast.

bf16 is not fast everywhere. A CPU without native bf16 instructions (no AVX512-BF16 or AMX)
emulates bf16 matmuls: on a 2-core AVX-512F machine a bf16 matmul ran at ~46 GFLOP/s against
~190 GFLOP/s in fp32, and a laptop-size language model trained 2.6–4× slower under bf16
autocast; on a 2-core AMD EPYC with AVX512-BF16 a 512² bf16 matmul runs ~2.1× faster than
fp32. ``auto`` therefore measures rather than guesses: on CPU it times bf16 and fp32 matmuls
(about 0.1 s, once per process) and takes bf16 only if it is faster; on CUDA it takes bf16
where the GPU supports it. The choice and its reason are returned so that callers can say
which path ran.
"""

from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("auto", "bf16", "fp32")
_PROBE_SIZE = 512  # large enough that the matmul kernel, not dispatch, dominates


def _matmul_seconds(repeats: int = 5, warmup_s: float = 0.05) -> dict[torch.dtype, float]:
    """Best time of one ``_PROBE_SIZE``² matmul in fp32 and in bf16, timed alternately.

    Each dtype first runs for ``warmup_s``: the first calls of a process pay for the thread
    pool, kernel selection and the clock ramp (measured: 14 ms for an fp32 matmul that then
    takes 1.4 ms), which a single warm-up call does not absorb. Alternating the timed calls
    exposes both dtypes to the same background load."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=generator) for _ in range(2))
    operands = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    for x, y in operands.values():
        started = time.perf_counter()
        while time.perf_counter() - started < warmup_s:
            x @ y
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(repeats):
        for dtype, (x, y) in operands.items():
            started = time.perf_counter()
            x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """Measured bf16 matmul throughput on this CPU as a multiple of fp32 (> 1: bf16 is faster)."""
    seconds = _matmul_seconds()
    return seconds[torch.float32] / seconds[torch.bfloat16]


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
