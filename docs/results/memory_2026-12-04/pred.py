"""The innovation predictor and score of one layer, fwd+bwd at L = 1,024, in float32 (as the model runs it) and bf16."""
import time, torch, torch.nn.functional as F
from bmojo.allocator import keep_freed_memory
from bmojo.ops.eidetic import innovation_scores
keep_freed_memory(); torch.set_num_threads(2)
x = torch.randn(1, 1024, 256, dtype=torch.bfloat16)
f = torch.randn(1, 1024, 256, dtype=torch.bfloat16)
w = torch.zeros(256, 256, requires_grad=True)
def run(dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        x_hat = F.linear(f.detach().to(dtype), w.to(dtype))
        s = innovation_scores(x.detach(), x_hat)
    s.mean().backward()
for dtype in (torch.float32, torch.bfloat16):
    for _ in range(3): run(dtype)
    ts = []
    for _ in range(21):
        t = time.perf_counter(); run(dtype); ts.append(time.perf_counter() - t)
    print(dtype, f"{sorted(ts)[10]*1e3:.2f} ms")
