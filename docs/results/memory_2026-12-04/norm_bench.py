"""The norms' fast paths against their references alone, fwd+bwd, paired."""
import statistics, torch
from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import paired_ratio, run_interleaved, timed
from bmojo.ops import norm as N
keep_freed_memory(); torch.set_num_threads(2)
L = 1024
x32 = torch.randn(1, L, 256, requires_grad=True); w256 = torch.ones(256, requires_grad=True)
yb = torch.randn(1, L, 512, dtype=torch.bfloat16, requires_grad=True); zb = torch.randn(1, L, 512, dtype=torch.bfloat16, requires_grad=True)
w512 = torch.ones(512, requires_grad=True)
for label, ref, fast, call in (("rms fp32 input", N.rms_norm_reference, N.rms_norm, lambda f: f(x32, w256, 1e-5)),
                               ("gated bf16", N.gated_rms_norm_reference, N.gated_rms_norm, lambda f: f(yb, zb, w512, 1, 1e-5))):
    def run(f):
        out = call(f); out.backward(torch.ones_like(out))
    t = run_interleaved({name: lambda f=f: timed(lambda: run(f), torch.device("cpu")) for name, f in (("ref", ref), ("fast", fast))}, repeats=51, warmup=5)
    print(label, f"ref {statistics.median(t['ref'])*1e3:.3f} ms fast {statistics.median(t['fast'])*1e3:.3f} ms paired {paired_ratio(t['ref'], t['fast']):.2f}x")
