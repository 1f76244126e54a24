"""The aten ops one training step dispatches (views included), counted by op and by the line of
bmojo that called them ("autograd": the engine's own backward formulas).

    python docs/results/targets_2026-12-04/count_ops.py [L] [PRECISION] [ARCH] [LINES]
"""

import collections
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs
from bmojo.bench.train import make_train_step
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel

keep_freed_memory()
torch.set_num_threads(2)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
arch = sys.argv[3] if len(sys.argv) > 3 else "bmojo"
lines = int(sys.argv[4]) if len(sys.argv) > 4 else 20
config = matched_configs([arch], dict(LM_SIZES["laptop"]), 257)[arch]
tokens = torch.randint(0, 257, (1, L + 1), generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)
step = make_train_step(LanguageModel(config), tokens, precision)
by_file, by_line, by_op = collections.Counter(), collections.Counter(), collections.Counter()


class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/bmojo/" in f.filename and "/bench/" not in f.filename]
        where = f"{frames[-1].filename.split('/bmojo/')[-1]}:{frames[-1].lineno}" if frames else "autograd"
        by_line[where] += 1
        by_file[where.split(":")[0]] += 1
        by_op[func.__name__] += 1
        return func(*args, **(kwargs or {}))


step()
step()
with Count():
    step()
print(f"{arch}: {sum(by_line.values())} ops dispatched in one step")
print("by file:", ", ".join(f"{name} {n}" for name, n in by_file.most_common()))
print("by op:", ", ".join(f"{name} {n}" for name, n in by_op.most_common(20)))
for where, n in by_line.most_common(lines):
    print(f"{n:6d}  {where}")
