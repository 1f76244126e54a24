"""The union attention's forward and backward: the code before the change that casts the
probabilities per key set against the current one, interleaved, at the laptop shapes (4 heads
of 64, W = F = C = M = 64, batch 1), bf16 and fp32; first whether both give the same output and
gradients, bit for bit.

    git show 8c8b81d:src/bmojo/ops/attention.py > /tmp/old_attention.py
    python docs/results/targets_2026-12-04/attn_contiguous_probs.py /tmp/old_attention.py L ROUNDS
"""

import importlib.util
import statistics
import sys

import torch

from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import paired_ratio, run_interleaved, timed
from bmojo.ops import attention as new

keep_freed_memory()
torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("old_attention", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
L, rounds = int(sys.argv[2]), int(sys.argv[3])
b, h, dh, W, Fs, C, M = 1, 4, 64, 64, 64, 64, 64


def measure(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to(dtype).requires_grad_()

    q, k, v, kf, vf, q_mem = (leaf(b, L, h, dh) for _ in range(6))
    mem_k, mem_v = leaf(b, L // C, M, h, dh), leaf(b, L // C, M, h, dh)
    mem_pos = torch.randint(-1, L, (b, L // C, M), generator=generator)

    inputs = (q, k, v, kf, vf, q_mem, mem_k, mem_v)

    def run(module):
        out = module.union_attention_chunked(q, k, v, W, Fs, kf, vf, mem_k, mem_v, mem_pos, q_mem, chunk_size=C)
        out.backward(torch.ones_like(out))
        return out

    results = {}
    for name, module in (("old", old), ("new", new)):
        for t in inputs:
            t.grad = None
        results[name] = [run(module).detach()] + [t.grad for t in inputs]
    same = all(torch.equal(o, n) for o, n in zip(results["old"], results["new"], strict=True))
    print(f"L={L} {dtype}: output and gradients equal bit for bit: {same}")

    runners = {name: lambda module=module: timed(lambda: run(module), torch.device("cpu"))
               for name, module in (("old", old), ("new", new))}
    times = run_interleaved(runners, rounds, warmup=3)
    ratio = paired_ratio(times["old"], times["new"])
    print(f"L={L} {dtype}: old {statistics.median(times['old']) * 1e3:.2f} ms, "
          f"new {statistics.median(times['new']) * 1e3:.2f} ms, paired old/new {ratio:.3f}")


for dtype in (torch.bfloat16, torch.float32):
    measure(dtype)
