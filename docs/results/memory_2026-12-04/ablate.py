"""B'MOJO with features removed (dataclasses.replace of its config), every step interleaved: ms and ratio to the Transformer."""
import sys, statistics, dataclasses, torch
from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs, paired_ratio, run_interleaved, timed
from bmojo.bench.train import make_train_step
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel
keep_freed_memory(); torch.set_num_threads(2)
L, precision, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
configs = matched_configs(["transformer", "bmojo", "bmojo-f", "mamba2"], dict(LM_SIZES["laptop"]), 257)
b = configs["bmojo"]
variants = {"transformer": configs["transformer"], "bmojo": b, "bmojo-f": configs["bmojo-f"], "mamba2": configs["mamba2"],
            "bmojo_nofading": dataclasses.replace(b, fading_span=0),
            "bmojo_random_sel": dataclasses.replace(b, selection="random"),
            "bmojo_neither": dataclasses.replace(b, fading_span=0, eidetic_capacity=0)}
tokens = torch.randint(0, 257, (1, L + 1))
steps = {}
for name, cfg in variants.items():
    torch.manual_seed(0)
    steps[name] = make_train_step(LanguageModel(cfg), tokens, precision)
    steps[name](); steps[name]()
times = run_interleaved({n: lambda s=s: timed(s, torch.device("cpu")) for n, s in steps.items()}, rounds, warmup=0)
for n in steps:
    r = paired_ratio(times["transformer"], times[n])
    print(f"{n:18s} {statistics.median(times[n])*1e3:7.1f} ms  x transformer {r:.3f}")
