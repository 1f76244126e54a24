"""The union attention's bf16 gradients against float64, and its fwd+bwd time, old (c8b3244) and new, paired."""
import statistics, torch
from old_code import old_module
from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import paired_ratio, run_interleaved, timed
from bmojo.ops import attention as new
keep_freed_memory(); torch.set_num_threads(2)
old = old_module("ops/attention.py")
b, h, dh, W, Fs, C, M, L = 1, 4, 64, 64, 64, 64, 64, 1024
g = torch.Generator().manual_seed(0)
mk = lambda *s: torch.randn(*s, generator=g)
base = {n: mk(b, L, h, dh) for n in ("q", "k", "v", "kf", "vf", "q_mem")}
base["mem_k"], base["mem_v"] = mk(b, L // C, M, h, dh), mk(b, L // C, M, h, dh)
mem_pos = torch.randint(-1, L, (b, L // C, M))
d_out = mk(b, L, h, dh)
def grads(mod, dtype):
    leaves = {n: t.to(dtype).requires_grad_() for n, t in base.items()}
    out = mod.union_attention_chunked(leaves["q"], leaves["k"], leaves["v"], W, Fs, leaves["kf"], leaves["vf"],
                                      leaves["mem_k"], leaves["mem_v"], mem_pos, leaves["q_mem"], chunk_size=C)
    out.backward(d_out.to(dtype))
    return {n: t.grad.double() for n, t in leaves.items()}
ref = grads(old, torch.float64)
for name, mod in (("old", old), ("new", new)):
    gr = grads(mod, torch.bfloat16)
    errs = {n: ((gr[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    print(name, " ".join(f"{n} {e:.2e}" for n, e in errs.items()))
for dtype in (torch.bfloat16, torch.float32):
    leaves = {n: t.to(dtype).requires_grad_() for n, t in base.items()}
    def run(mod):
        out = mod.union_attention_chunked(leaves["q"], leaves["k"], leaves["v"], W, Fs, leaves["kf"], leaves["vf"],
                                          leaves["mem_k"], leaves["mem_v"], mem_pos, leaves["q_mem"], chunk_size=C)
        out.backward(d_out.to(dtype))
    t = run_interleaved({name: lambda mod=mod: timed(lambda: run(mod), torch.device("cpu")) for name, mod in (("old", old), ("new", new))}, repeats=21, warmup=3)
    print(dtype, f"old {statistics.median(t['old'])*1e3:.2f} ms new {statistics.median(t['new'])*1e3:.2f} ms paired {paired_ratio(t['old'], t['new']):.3f}x")
