"""The union attention fwd+bwd at the laptop shapes (L = 1,024) without and with fading tokens."""
import time, torch
from bmojo.allocator import keep_freed_memory
from bmojo.ops.attention import union_attention_chunked
keep_freed_memory(); torch.set_num_threads(2)
b, h, dh, W, C, M, L = 1, 4, 64, 64, 64, 64, 1024
for dtype in (torch.bfloat16, torch.float32):
  for Fs in (0, 64):
    g = torch.Generator().manual_seed(0)
    leaf = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype).requires_grad_()
    q, k, v, kf, vf, qm = (leaf(b, L, h, dh) for _ in range(6))
    mem_k, mem_v, mem_pos = leaf(b, L // C, M, h, dh), leaf(b, L // C, M, h, dh), torch.randint(-1, L, (b, L // C, M))
    def run():
        out = union_attention_chunked(q, k, v, W, Fs, kf if Fs else None, vf if Fs else None, mem_k, mem_v, mem_pos, qm, chunk_size=C)
        out.backward(torch.ones_like(out))
    for _ in range(3): run()
    ts = []
    for _ in range(21):
        s = time.perf_counter(); run(); ts.append(time.perf_counter() - s)
    print(dtype, Fs, f"{sorted(ts)[10]*1e3:.2f} ms")
