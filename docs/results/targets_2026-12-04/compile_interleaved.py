"""B'MOJO and the Transformer, each eager and under torch.compile, timed interleaved in one process.

`bmojo bench train --compile` compares compiled B'MOJO with the compiled Transformer. Here all four
training steps run in every round, so B'MOJO compiled can also be set against the Transformer
eager (each model at its own best).

    python docs/results/targets_2026-12-04/compile_interleaved.py [L] [PRECISION] [ROUNDS]
"""

import statistics
import sys
import time

import torch

from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs, paired_ratio, run_interleaved, timed
from bmojo.bench.train import make_train_step
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel

keep_freed_memory()
torch.set_num_threads(2)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 11
configs = matched_configs(["transformer", "bmojo"], dict(LM_SIZES["laptop"]), 257)
tokens = torch.randint(0, 257, (1, L + 1), generator=torch.Generator().manual_seed(0))
steps = {}
for arch, config in configs.items():
    torch.manual_seed(0)
    model = LanguageModel(config)
    for mode in ("eager", "compiled"):
        forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
        step = make_train_step(forward, tokens, precision)
        start = time.perf_counter()
        step()
        print(f"{arch} {mode}: first step {time.perf_counter() - start:.1f} s", flush=True)
        steps[arch, mode] = step
times = run_interleaved({key: lambda step=step: timed(step, torch.device("cpu")) for key, step in steps.items()},
                        rounds, warmup=0)


def ratio(numerator, denominator):  # median over rounds of numerator time / denominator time
    return paired_ratio(times[numerator], times[denominator])


for key, seconds in times.items():
    print(f"{key[0]:12s} {key[1]:9s} {L / statistics.median(seconds):8.1f} tokens/s "
          f"[{L / max(seconds):.1f}-{L / min(seconds):.1f}]")
for arch in configs:
    print(f"{arch}: compiled {ratio((arch, 'eager'), (arch, 'compiled')):.2f}x its eager speed")
for transformer_mode, bmojo_mode in (("eager", "eager"), ("compiled", "compiled"), ("eager", "compiled")):
    print(f"bmojo {bmojo_mode} x transformer {transformer_mode}: "
          f"{ratio(('transformer', transformer_mode), ('bmojo', bmojo_mode)):.2f}")
