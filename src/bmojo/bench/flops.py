"""FLOPs of a training step, counted from a model's shapes, and the machine's measured matmul throughput.

A multiply-add is 2 FLOPs. For ``batch`` sequences of ``L`` tokens (``T = batch * L``)::

    train_step_flops = 6 * P_mm * T  +  4 * P_phi * T  +  3 * batch * sum over layers (attention + SSD)

- ``P_mm``: multiply-adds per token of the weight matmuls: every ``nn.Linear`` (``in * out``; the LM head
  too, though its weight is tied to the embedding, whose lookup costs nothing) and every depthwise
  convolution weight (Mamba-2's ``conv1d`` and B'MOJO's optional ``qkv_conv``, one multiply-add per
  weight per token). A B'MOJO layer with tied fading projections applies ``k_proj`` and ``v_proj``
  twice per token (to its input and to the SSM output), and they count twice. Forward 2 FLOPs per
  multiply-add, backward 4 (the gradients of the input and of the weight): 6 in all.
- ``P_phi``: the innovation predictor Φ (B layers with top-k selection). Its input is detached, so its
  backward computes only the weight gradient: 2 + 2 = 4.
- attention, per layer and sequence, forward: ``4 * head_dim * n_heads * pairs``: a query-key dot
  product and a probability-value product (``head_dim`` multiply-adds each) for every pair of a query
  and a key it can see (model FLOPs: masked-out scores that the fast path computes and discards are
  not counted). For the query at position ``i``:

  * raw keys: ``i + 1`` for full causal attention (``A``), ``min(i + 1, W)`` with a window;
  * fading keys (F, B layers): ``clip(i - W + 1, 0, F)``;
  * eidetic memory keys (B layers): ``min(M, k * floor(i / C))`` when ``i >= W``, else 0: the slots
    filled before the query's chunk if each chunk contributes its ``k = eidetic_per_chunk`` selections
    (an upper bound: a threshold may select fewer, and a slot whose position is ``> i - W`` is masked).

- SSD, per layer and sequence, forward: the chunked algorithm of :func:`bmojo.ops.ssd.ssd_chunked` on
  ``L`` padded to ``Lp``, a multiple of its chunk ``Q``, with ``h`` heads of ``p`` channels, ``g``
  groups and state ``n``: ``2 * Lp * (g*Q*n + h*(Q*p + 2*p*n))`` for the chunk-local scores ``C·B``
  (full ``Q x Q`` blocks, once per group), their product with the inputs, the chunk states, and the
  entering states' output.
  Element-wise work (decays, softmax, norms, activations) is not counted.
- Backward costs twice the forward for attention and SSD (gradients of both operands of every
  product): 3 times the forward in all.

Utilisation = (FLOPs / measured step time) / the throughput of a square matmul timed in the same
process, in the step's precision (under bf16 autocast the SSD and Φ still run in fp32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from bmojo.bench.common import Spread, run_interleaved, timed
from bmojo.config import ModelConfig
from bmojo.layers.attention import Attention
from bmojo.layers.bmojo import BMojoMixer
from bmojo.layers.mamba2 import Mamba2Mixer
from bmojo.models.lm import LanguageModel

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class StepFlops:
    """A training step's FLOPs by kind (module docstring); ``total`` is :func:`train_step_flops`."""

    matmul: int  # 6 * P_mm * T
    predictor: int  # 4 * P_phi * T
    attention: int  # 3 * forward attention FLOPs, all layers and sequences
    ssd: int  # 3 * forward SSD FLOPs, all layers and sequences

    @property
    def total(self) -> int:
        return self.matmul + self.predictor + self.attention + self.ssd


@functools.lru_cache(maxsize=256)  # a Python loop over the positions, asked for again per precision and arch
def attention_pairs(seq_len: int, window: int | None, fading_span: int = 0, memory_capacity: int = 0,
                    memory_per_chunk: int = 0, chunk_size: int = 1) -> int:
    """(query, key) pairs a layer scores in one sequence of ``seq_len`` tokens (module docstring)."""
    pairs = 0
    for i in range(seq_len):
        pairs += i + 1 if window is None else min(i + 1, window)
        if window is not None:
            pairs += min(max(i - window + 1, 0), fading_span)
            if memory_capacity and i >= window:
                pairs += min(memory_capacity, memory_per_chunk * (i // chunk_size))
    return pairs


def ssd_forward_flops(mixer: Mamba2Mixer, seq_len: int) -> int:
    """Forward FLOPs of the chunked SSD scan of ``mixer`` on one sequence (module docstring)."""
    q, h, g, p, n = mixer.chunk_size, mixer.nheads, mixer.ngroups, mixer.headdim, mixer.d_state
    padded = math.ceil(seq_len / q) * q
    return 2 * padded * (g * q * n + h * (q * p + 2 * p * n))


def _linear_macs(module: nn.Module | None) -> int:
    """Multiply-adds per token of every ``nn.Linear`` inside ``module`` (itself included)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def step_flops_breakdown(config: ModelConfig, batch: int, seq_len: int) -> StepFlops:
    """:class:`StepFlops` of a forward+backward step on ``batch`` sequences of ``seq_len`` tokens of
    ``LanguageModel(config)``, read from the model built on the meta device (no weights allocated)."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch}, {seq_len}")
    with torch.device("meta"):
        model = LanguageModel(config)
    tokens = batch * seq_len
    predictor_macs = sum(_linear_macs(getattr(block.mixer, "predictor", None)) for block in model.blocks)
    matmul_macs = _linear_macs(model) - predictor_macs
    attention = ssd = 0
    for block in model.blocks:
        mixer = block.mixer
        ssm = mixer if isinstance(mixer, Mamba2Mixer) else getattr(mixer, "ssm", None)
        if ssm is not None:
            matmul_macs += ssm.conv1d.weight.numel()
            ssd += ssd_forward_flops(ssm, seq_len)
        if isinstance(mixer, BMojoMixer):
            if mixer.fading_span > 0 and mixer.kf_proj is None:  # tied: k_proj and v_proj also project f
                matmul_macs += _linear_macs(mixer.k_proj) + _linear_macs(mixer.v_proj)
            if mixer.qkv_conv is not None:
                matmul_macs += mixer.qkv_conv.weight.numel()
            memory = mixer.eidetic_capacity, mixer.eidetic_per_chunk, mixer.chunk_size
            pairs = attention_pairs(seq_len, mixer.window, mixer.fading_span, *memory)
            attention += 4 * mixer.head_dim * mixer.n_heads * pairs
        elif isinstance(mixer, Attention):
            attention += 4 * mixer.head_dim * mixer.n_heads * attention_pairs(seq_len, mixer.window)
    return StepFlops(matmul=6 * matmul_macs * tokens, predictor=4 * predictor_macs * tokens,
                     attention=3 * batch * attention, ssd=3 * batch * ssd)


def train_step_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
    """FLOPs of one forward+backward step on ``batch`` sequences of ``seq_len`` tokens (module docstring)."""
    return step_flops_breakdown(config, batch, seq_len).total


def matmul_throughput(device: torch.device, precision: str, size: int, repeats: int, warmup: int) -> Spread:
    """FLOP/s of ``[size, size] @ [size, size]`` in ``precision`` (``2 * size**3`` FLOPs), median and range
    over ``repeats`` timed runs after ``warmup`` untimed ones."""
    if size < 1:
        raise ValueError(f"--matmul-size must be >= 1, got {size}")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, PRECISION_DTYPES[precision]) for _ in range(2))
    seconds = run_interleaved({"matmul": lambda: timed(lambda: a @ b, device)}, repeats, warmup)["matmul"]
    return Spread.of(seconds).inverse(2.0 * size**3)
