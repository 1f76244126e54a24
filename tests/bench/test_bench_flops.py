import dataclasses

import pytest
import torch

from bmojo.bench.flops import attention_pairs, matmul_throughput, step_flops_breakdown, train_step_flops
from bmojo.config import ModelConfig
from bmojo.layers.norm import RMSNorm
from bmojo.models.lm import LanguageModel


def test_attention_pairs_by_hand():
    # L = 6: causal 1+2+3+4+5+6; window 2: 1+2+2+2+2+2
    assert attention_pairs(6, None) == 21
    assert attention_pairs(6, 2) == 11
    # fading span 2 behind window 2: clip(i-1, 0, 2) for i = 0..5 -> 0,0,1,2,2,2
    assert attention_pairs(6, 2, fading_span=2) == 11 + 7
    # memory of 2 slots, 1 per chunk of 2, visible from i >= 2: min(2, i // 2) for i = 2..5 -> 1,1,2,2
    assert attention_pairs(6, 2, fading_span=2, memory_capacity=2, memory_per_chunk=1, chunk_size=2) == 11 + 7 + 6


def test_transformer_step_flops_by_hand():
    config = ModelConfig.preset("transformer", d_model=8, n_layers=1, n_heads=2, vocab_size=16, mlp_ratio=2.0)
    # multiply-adds per token: q, k, v, o 4*8*8 = 256; SwiGLU (hidden 16) 3*8*16 = 384; LM head 8*16 = 128
    matmul = 6 * (256 + 384 + 128) * (2 * 4)  # batch 2, L = 4
    # causal pairs 1+2+3+4 = 10, 4 * head_dim 4 * heads 2 FLOPs per pair, 2 sequences, x3 for the backward
    attention = 3 * 2 * (4 * 4 * 2 * 10)
    assert train_step_flops(config, batch=2, seq_len=4) == matmul + attention == 38784


def test_bmojo_step_flops_by_hand():
    config = ModelConfig.preset("bmojo", d_model=8, n_layers=1, n_heads=2, window=2, fading_span=2, chunk_size=2,
                                eidetic_per_chunk=1, eidetic_capacity=2, d_state=2, ssm_headdim=4, mlp_ratio=0,
                                vocab_size=16)
    # Mamba-2: d_inner 16, 4 heads of 4, state 2, one group; in_proj 8 -> 2*16 + 2*2 + 4 = 40, out_proj 16 -> 8,
    # conv over 16 + 2*2 = 20 channels, 4 taps. Attention q, k, v, o 4*64; tied fading k, v again 2*64; head 8*16.
    macs = 8 * 40 + 16 * 8 + 20 * 4 + 4 * 64 + 2 * 64 + 8 * 16
    predictor = 8 * 8  # full-rank Φ, weight gradient only
    pairs = 11 + 7 + 6  # raw, fading, memory (test_attention_pairs_by_hand)
    # SSD: a state of p*n = 8 elements per head gets chunks of Q = 32; L = 6 padded to one chunk:
    # 2 * 32 * (groups 1 * Q*n + heads 4 * (Q*p + 2*p*n)) = 2*32*(64 + 4*(128 + 16))
    ssd = 2 * 32 * (64 + 4 * 144)
    expected = 6 * macs * 6 + 4 * predictor * 6 + 3 * (4 * 4 * 2 * pairs + ssd)
    breakdown = step_flops_breakdown(config, batch=1, seq_len=6)
    assert (breakdown.matmul, breakdown.predictor) == (6 * macs * 6, 4 * predictor * 6)
    assert (breakdown.attention, breakdown.ssd) == (3 * 4 * 4 * 2 * pairs, 3 * ssd)
    assert train_step_flops(config, batch=1, seq_len=6) == expected == 164160
    # A convolution of width 3 over q, k, v (8 + 8 + 8 channels): 24 * 3 more multiply-adds per token.
    with_conv = dataclasses.replace(config, qkv_conv=3)
    assert step_flops_breakdown(with_conv, batch=1, seq_len=6).matmul == 6 * (macs + 24 * 3) * 6


def test_matmul_flops_are_six_per_parameter_and_token_for_a_transformer():
    # Independent of the layer walk: every parameter but the norms' is a matmul weight (embedding tied to the head).
    config = ModelConfig.preset("transformer", d_model=32, n_layers=2, n_heads=4, vocab_size=50)
    model = LanguageModel(config)
    norm_params = sum(p.numel() for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters())
    assert step_flops_breakdown(config, 3, 20).matmul == 6 * (model.num_params() - norm_params) * 3 * 20


def test_attention_flops_grow_linearly_with_a_window_and_quadratically_without():
    swa = ModelConfig.preset("swa", d_model=16, n_layers=1, n_heads=2, window=8, vocab_size=10)
    full = ModelConfig.preset("transformer", d_model=16, n_layers=1, n_heads=2, vocab_size=10)
    # past the window every query sees W = 8 keys: 1000 more tokens cost 3 * 4 * head_dim 8 * heads 2 * 8 * 1000
    grown = step_flops_breakdown(swa, 1, 2000).attention - step_flops_breakdown(swa, 1, 1000).attention
    assert grown == 3 * 4 * 8 * 2 * 8 * 1000
    assert step_flops_breakdown(full, 1, 2000).attention > 3.9 * step_flops_breakdown(full, 1, 1000).attention


def test_bad_step_shape_is_a_value_error():
    with pytest.raises(ValueError, match="batch and seq_len must be >= 1"):
        train_step_flops(ModelConfig.preset("swa"), 0, 8)


def test_matmul_throughput_is_positive():
    spread = matmul_throughput(torch.device("cpu"), "fp32", size=16, repeats=2, warmup=0)
    assert 0 < spread.min <= spread.median <= spread.max and spread.repeats == 2
