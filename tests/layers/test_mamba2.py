"""Mamba-2 mixer (DESIGN.md §3.1, §7, §8.2–§8.5).

The reference is written out here, independent of ``bmojo.ops``: the forward pass of the
``mamba_ssm`` Mamba-2 "simple" block (ngroups, no MLP part) from a plain state dict with the
reference key names, with a Python loop over time for the SSM recurrence.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from bmojo.layers import Mamba2Mixer

D_MODEL, D_STATE, D_CONV, EXPAND, HEADDIM, CHUNK = 32, 8, 4, 2, 16, 64
D_INNER = EXPAND * D_MODEL
NHEADS = D_INNER // HEADDIM
REFERENCE_KEYS = {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
}


def reference_state_dict(ngroups: int, seed: int = 0, d_conv: int = D_CONV) -> dict:
    """Random weights with exactly the reference Mamba-2 key names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    conv_dim = D_INNER + 2 * ngroups * D_STATE
    d_in_proj = 2 * D_INNER + 2 * ngroups * D_STATE + NHEADS
    dt = torch.exp(torch.rand(NHEADS, generator=gen) * (math.log(0.5) - math.log(0.01))
                   + math.log(0.01))
    return {
        "in_proj.weight": torch.randn(d_in_proj, D_MODEL, generator=gen) / math.sqrt(D_MODEL),
        "conv1d.weight": 0.5 * torch.randn(conv_dim, 1, d_conv, generator=gen),
        "conv1d.bias": 0.1 * torch.randn(conv_dim, generator=gen),
        "dt_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus^-1(dt)
        "A_log": torch.log(1.0 + 15.0 * torch.rand(NHEADS, generator=gen)),
        "D": torch.randn(NHEADS, generator=gen),
        "norm.weight": 1.0 + 0.3 * torch.randn(D_INNER, generator=gen),
        "out_proj.weight": torch.randn(D_MODEL, D_INNER, generator=gen) / math.sqrt(D_INNER),
    }


def reference_mamba2(sd: dict, u: torch.Tensor, ngroups: int, headdim: int = HEADDIM,
                     d_state: int = D_STATE) -> torch.Tensor:
    """Plain Mamba-2 block forward, ``u [B, L, d_model] -> [B, L, d_model]``."""
    bsz, L, _ = u.shape
    nheads = sd["A_log"].shape[0]
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    d_conv = sd["conv1d.weight"].shape[-1]
    zxbcdt = u @ sd["in_proj.weight"].T
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner:d_inner + conv_dim]
    dt = zxbcdt[..., d_inner + conv_dim:]
    assert dt.shape[-1] == nheads
    # Depthwise causal conv1d: padding d_conv - 1 on both sides, keep the first L outputs.
    xBC = F.conv1d(xBC.transpose(1, 2), sd["conv1d.weight"], sd["conv1d.bias"],
                   padding=d_conv - 1, groups=conv_dim)[..., :L].transpose(1, 2)
    xBC = xBC * torch.sigmoid(xBC)
    x = xBC[..., :d_inner].reshape(bsz, L, nheads, headdim)
    Bm = xBC[..., d_inner:d_inner + ngroups * d_state].reshape(bsz, L, ngroups, d_state)
    Cm = xBC[..., d_inner + ngroups * d_state:].reshape(bsz, L, ngroups, d_state)
    dt = F.softplus(dt + sd["dt_bias"])  # [B, L, nheads]
    A = -torch.exp(sd["A_log"])  # [nheads]
    heads_per_group = nheads // ngroups
    group_of_head = torch.arange(nheads) // heads_per_group
    S = torch.zeros(bsz, nheads, headdim, d_state)
    ys = []
    for t in range(L):
        Bt = Bm[:, t, group_of_head]  # [B, nheads, d_state]
        Ct = Cm[:, t, group_of_head]
        decay = torch.exp(dt[:, t] * A)  # [B, nheads]
        dBx = (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]  # [B, h, p, n]
        S = decay[:, :, None, None] * S + dBx
        ys.append((S * Ct[:, :, None, :]).sum(-1) + sd["D"][None, :, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(bsz, L, d_inner)
    # Gated RMSNorm, norm_before_gate=False, per group of d_inner / ngroups channels.
    g = (y * z * torch.sigmoid(z)).reshape(bsz, L, ngroups, d_inner // ngroups)
    g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)
    y = g.reshape(bsz, L, d_inner) * sd["norm.weight"]
    return y @ sd["out_proj.weight"].T


def make_mixer(ngroups: int, seed: int = 0, d_conv: int = D_CONV) -> tuple[Mamba2Mixer, dict]:
    mixer = Mamba2Mixer(D_MODEL, d_state=D_STATE, d_conv=d_conv, expand=EXPAND, headdim=HEADDIM,
                        ngroups=ngroups, chunk_size=CHUNK)
    sd = reference_state_dict(ngroups, seed, d_conv)
    mixer.load_state_dict(sd, strict=True)
    return mixer, sd


def _input(L: int, seed: int = 100, b: int = 2) -> torch.Tensor:
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_state_dict_keys_and_shapes_are_the_reference_ones(ngroups: int) -> None:
    mixer = Mamba2Mixer(D_MODEL, d_state=D_STATE, expand=EXPAND, headdim=HEADDIM, ngroups=ngroups)
    sd = reference_state_dict(ngroups)
    own = mixer.state_dict()
    assert set(own) == REFERENCE_KEYS
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    result = mixer.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in sd.items():
        torch.testing.assert_close(mixer.state_dict()[name], tensor, atol=0, rtol=0)
    with pytest.raises(RuntimeError):
        mixer.load_state_dict({**sd, "extra.weight": torch.zeros(1)}, strict=True)


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("L", [1, 2, 37, 64, 130])
def test_forward_equals_reference_block(ngroups: int, L: int) -> None:
    mixer, sd = make_mixer(ngroups, seed=L)
    u = _input(L, seed=L + 1)
    with torch.no_grad():
        torch.testing.assert_close(mixer(u), reference_mamba2(sd, u, ngroups), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_gradients_equal_reference(ngroups: int) -> None:
    mixer, sd = make_mixer(ngroups, seed=7)
    L = 37
    u = _input(L, seed=8).requires_grad_(True)
    u_ref = u.detach().clone().requires_grad_(True)
    sd_ref = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    g = torch.randn(2, L, D_MODEL, generator=torch.Generator().manual_seed(9))
    (mixer(u) * g).sum().backward()
    (reference_mamba2(sd_ref, u_ref, ngroups) * g).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, atol=1e-4, rtol=1e-4)
    params = dict(mixer.named_parameters())
    for name, ref in sd_ref.items():
        torch.testing.assert_close(params[name].grad, ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_init_ranges_and_no_weight_decay() -> None:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(64, d_state=8, expand=2, headdim=4)  # 32 heads
    assert mixer.nheads == 32
    dt = F.softplus(mixer.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert dt.max() / dt.min() > 5  # spread over the log-uniform range, not a constant
    minus_a = torch.exp(mixer.A_log.detach())
    assert minus_a.min() >= 1.0 - 1e-5 and minus_a.max() <= 16.0 + 1e-4
    assert minus_a.max() - minus_a.min() > 3
    torch.testing.assert_close(mixer.D.detach(), torch.ones(32), atol=0, rtol=0)
    torch.testing.assert_close(mixer.norm.weight.detach(), torch.ones(128), atol=0, rtol=0)
    no_wd = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_wd == {"A_log", "D", "dt_bias"}


def test_init_respects_custom_ranges() -> None:
    torch.manual_seed(1)
    mixer = Mamba2Mixer(64, d_state=8, headdim=4, dt_min=0.01, dt_max=0.02, A_init_range=(2.0, 3.0))
    dt = F.softplus(mixer.dt_bias.detach())
    assert dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.02 * (1 + 1e-4)
    minus_a = torch.exp(mixer.A_log.detach())
    assert minus_a.min() >= 2.0 - 1e-5 and minus_a.max() <= 3.0 + 1e-5


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError):
        Mamba2Mixer(32, expand=2, headdim=48)  # d_inner 64 not a multiple of 48
    with pytest.raises(ValueError):
        Mamba2Mixer(32, expand=2, headdim=16, ngroups=3)  # 4 heads, 3 groups


def test_ssd_kernel_is_checked_when_the_layer_is_built(monkeypatch) -> None:
    with pytest.raises(ValueError, match="^ssd_kernel='cuda' is invalid: must be one of"):
        Mamba2Mixer(32, ssd_kernel="cuda")
    monkeypatch.setitem(sys.modules, "bmojo.ops.ssd_triton", None)  # an import of it raises ImportError
    with pytest.raises(ValueError, match="^ssd_kernel='triton': import of bmojo.ops.ssd_triton halted"):
        Mamba2Mixer(32, ssd_kernel="triton")


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("d_conv", [2, 4])
def test_step_from_fresh_cache_equals_forward(ngroups: int, d_conv: int) -> None:
    mixer, _ = make_mixer(ngroups, seed=11, d_conv=d_conv)
    L = 70
    u = _input(L, seed=12)
    cache = mixer.new_cache(2)
    assert cache.conv_state.shape == (2, mixer.conv_dim, d_conv - 1)
    assert cache.ssm_state.shape == (2, NHEADS, HEADDIM, D_STATE)
    assert cache.ssm_state.dtype == torch.float32
    with torch.no_grad():
        full = mixer(u)
        steps = torch.stack([mixer.step(u[:, t], cache) for t in range(L)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    assert cache.conv_state.shape == (2, mixer.conv_dim, d_conv - 1)  # fixed size


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("prefix", [1, 2, 3, 37, 64, 65])
def test_prefill_then_step_equals_forward(ngroups: int, prefix: int) -> None:
    mixer, sd = make_mixer(ngroups, seed=13)
    L = 80
    u = _input(L, seed=prefix)
    cache = mixer.new_cache(2)
    with torch.no_grad():
        full = mixer(u)
        head = mixer(u[:, :prefix], cache)
        tail = torch.stack([mixer.step(u[:, t], cache) for t in range(prefix, L)], 1)
    torch.testing.assert_close(head, full[:, :prefix], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, full[:, prefix:], atol=1e-5, rtol=1e-5)
    assert cache.ssm_state.dtype == torch.float32


def test_prefill_overwrites_a_used_cache() -> None:
    """``forward(x, cache)`` starts from position 0: a cache that already holds state is reset."""
    mixer, _ = make_mixer(1, seed=14)
    u = _input(20, seed=15)
    cache = mixer.new_cache(2)
    with torch.no_grad():
        mixer(_input(9, seed=16), cache)
        mixer(u[:, :10], cache)
        tail = torch.stack([mixer.step(u[:, t], cache) for t in range(10, 20)], 1)
        full = mixer(u)
    torch.testing.assert_close(tail, full[:, 10:], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_backward() -> None:
    mixer, _ = make_mixer(2, seed=17)
    u = _input(100, seed=18).requires_grad_(True)
    with torch.no_grad():
        ref = mixer(u)
        ref_cache = mixer.new_cache(2)
        mixer(u, ref_cache)
    cache = mixer.new_cache(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(u, cache)
    assert torch.isfinite(y).all()
    assert cache.ssm_state.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.1)
    # The scan runs in float32 even under autocast; the bf16 projections and conv before it
    # are what separate the state from the fp32 run.
    torch.testing.assert_close(cache.ssm_state, ref_cache.ssm_state, atol=0.1, rtol=0.1)
    y.float().pow(2).mean().backward()
    assert torch.isfinite(u.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = mixer.step(u[:, 0].detach(), cache)
    assert torch.isfinite(out).all()
    assert cache.ssm_state.dtype == torch.float32


def test_bf16_weights_keep_float32_state() -> None:
    mixer, _ = make_mixer(1, seed=19)
    u = _input(30, seed=20)
    with torch.no_grad():
        ref = mixer(u)
    mixer = mixer.to(torch.bfloat16)
    cache = mixer.new_cache(2)
    assert cache.ssm_state.dtype == torch.float32
    assert cache.conv_state.dtype == torch.bfloat16
    with torch.no_grad():
        head = mixer(u[:, :20].bfloat16(), cache)
        tail = torch.stack([mixer.step(u[:, t].bfloat16(), cache) for t in range(20, 30)], 1)
    assert head.dtype == tail.dtype == torch.bfloat16
    assert cache.ssm_state.dtype == torch.float32
    torch.testing.assert_close(torch.cat([head, tail], 1).float(), ref, atol=0.15, rtol=0.15)
