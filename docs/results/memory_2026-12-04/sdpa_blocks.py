"""PyTorch's fused CPU SDPA over one query block's keys (64 queries, 320 keys, a mask) against
_BlockAttention at the laptop shapes (L = 1,024), fwd+bwd, medians of 15."""
import time, torch, torch.nn.functional as F
from bmojo.allocator import keep_freed_memory
from bmojo.ops.attention import union_attention_chunked
keep_freed_memory(); torch.set_num_threads(2)
n, hh, R, S, dh = 4, 16, 64, 320, 64
for dtype in (torch.float32, torch.bfloat16):
  for d in (64, 128):
    q = torch.randn(n, hh, R, d, dtype=dtype, requires_grad=True)
    k = torch.randn(n, hh, S, d, dtype=dtype, requires_grad=True)
    v = torch.randn(n, hh, S, dh, dtype=dtype, requires_grad=True)
    mask = torch.rand(1, hh, R, S) > 0.5
    mask[..., 0] = True
    fmask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    for name, m in (("bool", mask), ("float", fmask)):
        def run():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m); o.backward(torch.ones_like(o))
        for _ in range(3): run()
        ts = []
        for _ in range(15):
            s = time.perf_counter(); run(); ts.append(time.perf_counter() - s)
        with torch.profiler.profile() as p: run()
        kernel = [e.key for e in p.key_averages() if "flash" in e.key or "math" in e.key][0]
        print("SDPA", dtype, f"head dim {d}", name, "mask", f"{sorted(ts)[7]*1e3:.2f} ms", kernel)

b, h, dh, W, Fs, C, M, L = 1, 4, 64, 64, 64, 64, 64, 1024
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    leaf = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype).requires_grad_()
    q, k, v, kf, vf, qm = (leaf(b, L, h, dh) for _ in range(6))
    mem_k, mem_v, mem_pos = leaf(b, L // C, M, h, dh), leaf(b, L // C, M, h, dh), torch.randint(-1, L, (b, L // C, M))
    def run():
        out = union_attention_chunked(q, k, v, W, Fs, kf, vf, mem_k, mem_v, mem_pos, qm, chunk_size=C)
        out.backward(torch.ones_like(out))
    for _ in range(3): run()
    ts = []
    for _ in range(15):
        s = time.perf_counter(); run(); ts.append(time.perf_counter() - s)
    print("_BlockAttention", dtype, f"{sorted(ts)[7]*1e3:.2f} ms")
