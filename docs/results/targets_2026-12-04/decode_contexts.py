"""Decode latency after a short and a long prefill, alternated in one process.

`bmojo bench decode` measures every context in turn (all 1K runs, then all 32K runs), so a
machine that slows down between the two shows up as growth with the context. Here each round
decodes after a 1K and after a 32K prefill, one right after the other, and the ratio is taken
per round. Mamba-2, whose step does no work that depends on the context, is the control.

    python docs/results/targets_2026-12-04/decode_contexts.py [ROUNDS]
"""

import statistics
import sys
import time

import torch

from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs, paired_ratio, run_interleaved
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel

keep_freed_memory()
torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
contexts, steps = (1024, 32768), 32
archs = ["mamba2", "bmojo-f", "bmojo"]
configs = matched_configs(archs, dict(LM_SIZES["laptop"]), 257)
generator = torch.Generator().manual_seed(0)
prompts = {n: torch.randint(0, 257, (1, n), generator=generator) for n in contexts}


def decode_ms_per_token(model: LanguageModel, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        cache = model.new_cache(1, max_seq_len=prompt.shape[1] + steps)
        token = model(prompt, cache=cache).logits[:, -1].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model.step(token, cache).argmax(-1)
        return (time.perf_counter() - start) / steps * 1e3


for arch in archs:
    torch.manual_seed(0)
    model = LanguageModel(configs[arch]).eval()
    decode_ms_per_token(model, prompts[1024])  # warm-up
    times = run_interleaved({n: lambda n=n, model=model: decode_ms_per_token(model, prompts[n]) for n in contexts},
                            rounds, warmup=0)
    ratio = paired_ratio(times[32768], times[1024])
    print(f"{arch:8s} decode ms/token at 1K {statistics.median(times[1024]):.2f} "
          f"[{min(times[1024]):.2f}-{max(times[1024]):.2f}], at 32K {statistics.median(times[32768]):.2f} "
          f"[{min(times[32768]):.2f}-{max(times[32768]):.2f}]; 32K / 1K per round, median {ratio:.2f}x", flush=True)
