"""One architecture's training step under torch.profiler: the ops that took the most time.

    python docs/results/targets_2026-12-04/profile_step.py [L] [PRECISION] [ARCHS] [ROWS]

Each architecture runs 3 untimed steps, then 3 profiled ones; the table sums the 3 (divide by 3
for one step).
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs
from bmojo.bench.train import make_train_step
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel

keep_freed_memory()
torch.set_num_threads(2)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
archs = (sys.argv[3] if len(sys.argv) > 3 else "transformer,bmojo").split(",")
rows = int(sys.argv[4]) if len(sys.argv) > 4 else 20
configs = matched_configs(archs, dict(LM_SIZES["laptop"]), 257)
tokens = torch.randint(0, 257, (1, L + 1), generator=torch.Generator().manual_seed(0))
for arch in archs:
    torch.manual_seed(0)
    step = make_train_step(LanguageModel(configs[arch]), tokens, precision)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(arch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))
