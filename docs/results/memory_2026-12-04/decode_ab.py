"""Decoding steps with the norm and SwiGLU references and with their fast paths (which take the references' ops without grad), paired."""
import sys, statistics, torch
import bmojo.layers.norm as norm_layer, bmojo.layers.mlp as mlp_layer
from bmojo.ops import norm as N, activation as A
from bmojo.bench.common import matched_configs, paired_ratio, run_interleaved, timed
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel
torch.set_num_threads(2)
versions = {"reference": (N.rms_norm_reference, N.gated_rms_norm_reference, A.swiglu_reference),
            "fast": (N.rms_norm, N.gated_rms_norm, A.swiglu)}
def use(name): norm_layer.rms_norm, norm_layer.gated_rms_norm, mlp_layer.swiglu = versions[name]
N_, steps = 1024, 64
configs = matched_configs(["mamba2", "bmojo"], dict(LM_SIZES["laptop"]), 257)
for arch in configs:
    torch.manual_seed(0)
    model = LanguageModel(configs[arch]).eval()
    with torch.no_grad():
        cache = model.new_cache(1, max_seq_len=N_ + 40 * steps)
        token = model(torch.randint(0, 257, (1, N_)), cache=cache).logits[:, -1].argmax(-1)
        last = {"token": token}  # the greedy token carried from one timed run to the next
        def decode(n):
            use(n)
            def tokens():
                for _ in range(steps): last["token"] = model.step(last["token"], cache).argmax(-1)
            return timed(tokens, torch.device("cpu")) / steps * 1e3
        times = run_interleaved({n: lambda n=n: decode(n) for n in versions}, repeats=15, warmup=0)
    print(arch, {n: round(statistics.median(v), 3) for n, v in times.items()},
          f"paired {paired_ratio(times['reference'], times['fast']):.3f}x")
