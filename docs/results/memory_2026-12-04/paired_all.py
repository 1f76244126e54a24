"""Whole training steps with the old (c8b3244) union attention, SSD and norm formulas, and with the new ones, paired; peak memory of each."""
import sys, statistics, torch
from old_code import old_module
import bmojo.layers.norm as norm_layer, bmojo.layers.mamba2 as mamba2_layer
import bmojo.ops.attention as new_attention
from bmojo.ops import norm as ops_norm
from bmojo.allocator import keep_freed_memory
from bmojo.bench.common import matched_configs, paired_ratio, run_interleaved, timed
from bmojo.bench.train import make_train_step
from bmojo.bench.memory import peak_bytes
from bmojo.config import LM_SIZES
from bmojo.models.lm import LanguageModel
keep_freed_memory(); torch.set_num_threads(2)
old_attention, old_ssd = old_module("ops/attention.py"), old_module("ops/ssd.py")
L, precision, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
archs = sys.argv[4].split(",")
configs = matched_configs(archs, dict(LM_SIZES["laptop"]), 257)
tokens = torch.randint(0, 257, (1, L + 1))
for arch in archs:
    torch.manual_seed(0)
    model = LanguageModel(configs[arch])
    versions = {"base": (old_attention.union_attention_chunked, ops_norm.rms_norm_reference, ops_norm.gated_rms_norm_reference, old_ssd.ssd_chunked),
                "new": (new_attention.union_attention_chunked, ops_norm.rms_norm, ops_norm.gated_rms_norm, mamba2_layer.ssd_chunked)}
    def use(name):
        attn, norm_layer.rms_norm, norm_layer.gated_rms_norm, mamba2_layer.ssd_chunked = versions[name]
        for block in model.blocks:
            if hasattr(block.mixer, "parallel_attention") and block.mixer.parallel_attention in (old_attention.union_attention_chunked, new_attention.union_attention_chunked):
                block.mixer.parallel_attention = attn
    step = make_train_step(model, tokens, precision)
    peaks = {}
    for name in versions: use(name); step(); peaks[name] = peak_bytes(step, torch.device("cpu")) / 2**20
    def timed_with(name):
        use(name); return timed(step, torch.device("cpu"))
    times = run_interleaved({name: lambda name=name: timed_with(name) for name in versions}, rounds, warmup=0)
    print(f"{arch} {precision} L={L}: base {statistics.median(times['base'])*1e3:.1f} ms {peaks['base']:.1f} MiB, "
          f"new {statistics.median(times['new'])*1e3:.1f} ms {peaks['new']:.1f} MiB, "
          f"paired speed-up {paired_ratio(times['base'], times['new']):.3f}x", flush=True)
