"""SSD scan (DESIGN.md §3.1, §8.2, §8.5): chunked fast path == sequential reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from bmojo.ops import ssd as ssd_module
from bmojo.ops import ssd_chunked, ssd_sequential, ssd_step
from bmojo.ops.ssd import decay, decay_matrix

B_, H, P, N = 2, 4, 8, 8
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(
    l: int,
    g: int,
    *,
    with_init: bool = True,
    with_d: bool = True,
    seed: int = 0,
    b: int = B_,
    h: int = H,
    p: int = P,
    n: int = N,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | None]:
    """Random inputs in realistic ranges: dt in [1e-3, 0.1], A in [-16, -1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = (1e-3 + (0.1 - 1e-3) * torch.rand(b, l, h, generator=gen)).to(dtype)
    A = (-1.0 - 15.0 * torch.rand(h, generator=gen)).to(dtype)
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype) if with_d else None
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype) if with_init else None
    return {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": s0}


def run_with_grads(fn, inputs, seed: int = 1, **kwargs):
    """Run ``fn`` on leaf copies of ``inputs``; return (y, final_state, {name: grad})."""
    leaves = {
        k: (None if v is None else v.detach().clone().requires_grad_(True))
        for k, v in inputs.items()
    }
    y, state = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device)
    gs = torch.randn(state.shape, generator=gen, dtype=torch.float32).to(state.device)
    loss = (y.float() * gy).sum() + (state * gs).sum()
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y.detach(), state.detach(), dict(zip(names, grads, strict=True))


@functools.cache
def sequential_reference(l: int, g: int, with_init: bool, with_d: bool):
    inputs = make_inputs(l, g, with_init=with_init, with_d=with_d, seed=1000 + l)
    return inputs, run_with_grads(ssd_sequential, inputs)


# (g, with_init, with_d): every pair of values of any two factors occurs once.
CONFIGS = [(1, False, False), (1, True, True), (2, True, False), (2, False, True)]


@pytest.mark.parametrize(("g", "with_init", "with_d"), CONFIGS)
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("l", [1, 2, 63, 64, 100, 257])
def test_chunked_matches_sequential(l, chunk_size, g, with_init, with_d):
    inputs, (y_ref, s_ref, g_ref) = sequential_reference(l, g, with_init, with_d)
    y, s, grads = run_with_grads(ssd_chunked, inputs, chunk_size=chunk_size)

    assert y.shape == (B_, l, H, P) and y.dtype == torch.float32
    assert s.shape == (B_, H, P, N) and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == g_ref.keys()
    assert ("D" in grads) == with_d and ("initial_state" in grads) == with_init
    for name in grads:
        ref = g_ref[name]
        # dA sums over b*l*h*p*n terms: scale its tolerance with its magnitude.
        atol = 1e-4 * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[name], ref, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_matches_sequential_when_decays_underflow(chunk_size):
    """Decays far below float32's normal range (``dt·A`` down to -150 per step, so chunk sums
    reach -2400) are flushed to zero in both paths; outputs, states and gradients still agree
    and stay finite."""
    inputs = make_inputs(40, 1, seed=11)
    inputs["dt"] = inputs["dt"] * 5.0  # up to 0.5
    inputs["A"] = inputs["A"] * 20.0  # down to -320
    y_ref, s_ref, g_ref = run_with_grads(ssd_sequential, inputs)
    y, s, grads = run_with_grads(ssd_chunked, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)
    for name, ref in g_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_is_exp_with_subnormal_results_flushed_to_zero(dtype):
    tiny = torch.finfo(dtype).tiny
    in_range = torch.tensor([0.0, -1e-3, -1.0, -20.0, -80.0, -86.9], dtype=dtype)
    torch.testing.assert_close(decay(in_range), torch.exp(in_range), rtol=0, atol=0)
    below = torch.tensor([math.log(tiny) - 0.5, -1e4, float("-inf")], dtype=dtype)
    assert (decay(below) == 0).all()
    leaf = torch.cat([in_range, below]).requires_grad_(True)
    decay(leaf).sum().backward()
    expected = torch.cat([torch.exp(in_range), torch.zeros_like(below)])
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_decay_matrix_keeps_float32_precision_of_each_segment():
    """Entry ``[i, j]`` is ``exp`` of the float64 sum of ``a[j+1..i]`` to float32's precision
    *of that sum*, even after a long run of large decays (a plain float32 difference of
    cumulative sums reaching -1900 is off by ~1e-4 relative on short segments); zero above the
    diagonal and where the sum is below :func:`decay`'s floor (-87, where float32 results
    turn subnormal)."""
    gen = torch.Generator().manual_seed(5)
    T = 64
    a = (-30.0 * torch.rand(3, T, generator=gen)).float()
    a[:, ::7] = -1e-3  # short, weak steps between the large ones
    exact = torch.full((3, T, T), float("-inf"), dtype=torch.float64)
    for i in range(T):
        for j in range(i + 1):
            exact[:, i, j] = a[:, j + 1: i + 1].double().sum(-1)
    floor = math.ceil(math.log(torch.finfo(torch.float32).tiny))
    clear = (exact - floor).abs() > 1e-4  # sums at the floor may round to either side
    normal = (exact >= floor) & clear
    expected = exact.exp()
    got = decay_matrix(a).double()
    assert (got[(exact < floor) & clear] == 0).all()
    eps = torch.finfo(torch.float32).eps
    tolerance = 4 * eps * (1 + exact[normal].abs()) * expected[normal]
    assert ((got[normal] - expected[normal]).abs() <= tolerance).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_matrix_keeps_a_segment_exactly_at_the_floor_and_zeroes_one_below(dtype):
    floor = math.ceil(math.log(torch.finfo(dtype).tiny))
    a = torch.tensor([0.0, floor, -0.5, 0.0], dtype=dtype)  # segments: [1,0] at the floor, [2,0] below it
    got = decay_matrix(a)
    kept = torch.tensor([got[1, 0], got[2, 1]], dtype=torch.float64)
    torch.testing.assert_close(kept, torch.tensor([math.exp(floor), math.exp(-0.5)], dtype=torch.float64),
                               rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert got[2, 0] == 0 and got[3, 0] == 0 and got[3, 2] == 1
    assert (got.triu(1) == 0).all() and (got.diagonal() == 1).all()


def test_decay_matrix_rejects_half_precision():
    with pytest.raises(ValueError, match="float32 or float64"):
        decay_matrix(torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("l", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_scan_gets_contiguous_head_major_inputs(monkeypatch, b, l, dtype):
    """The layout ssd_chunked promises the scan: a strided x·dt (a permuted view) would make
    each batched matmul of the scan copy it again (docs/performance.md)."""
    seen = []
    apply = ssd_module._ChunkScan.apply

    def spy(*args):
        seen.append([t.is_contiguous() for t in args])
        return apply(*args)

    monkeypatch.setattr(ssd_module._ChunkScan, "apply", spy)
    inputs = make_inputs(l, 2, b=b, dtype=dtype)
    ssd_chunked(**inputs, chunk_size=32)
    assert seen == [[True] * 5]


def test_final_state_not_changed_by_padding():
    """l = 100 is padded to 128 with dt = 0: the final state must be the state at l - 1."""
    inputs = make_inputs(100, 2, seed=3)
    _, s_short = ssd_chunked(**inputs, chunk_size=64)
    _, s_seq = ssd_sequential(**inputs)
    torch.testing.assert_close(s_short, s_seq, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_tiny():
    """Finite differences on a tiny case, at gradcheck's default tolerances (float64 inputs
    are computed in float64)."""
    inputs = make_inputs(5, 1, b=1, h=2, p=2, n=3, seed=7, dtype=torch.float64)
    names = list(GRAD_NAMES)
    leaves = [inputs[k].clone().requires_grad_(True) for k in names]

    def fn(x, dt, A, B, C, D, s0):
        return ssd_chunked(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_step_matches_explicit_definition(g, with_d):
    gen = torch.Generator().manual_seed(11)
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, h, p, generator=gen)
    dt = 1e-3 + (0.1 - 1e-3) * torch.rand(b, h, generator=gen)
    A = -1.0 - 15.0 * torch.rand(h, generator=gen)
    Bm = torch.randn(b, g, n, generator=gen)
    Cm = torch.randn(b, g, n, generator=gen)
    D = torch.randn(h, generator=gen) if with_d else None
    S = torch.randn(b, h, p, n, generator=gen)

    y, S_new = ssd_step(x, dt, A, Bm, Cm, S, D)

    y_exp = torch.zeros(b, h, p)
    S_exp = torch.zeros(b, h, p, n)
    for bi in range(b):
        for hi in range(h):
            grp = hi // (h // g)
            decay = torch.exp(dt[bi, hi] * A[hi])
            S_exp[bi, hi] = decay * S[bi, hi] + dt[bi, hi] * torch.outer(x[bi, hi], Bm[bi, grp])
            y_exp[bi, hi] = S_exp[bi, hi] @ Cm[bi, grp]
            if with_d:
                y_exp[bi, hi] += D[hi] * x[bi, hi]
    torch.testing.assert_close(S_new, S_exp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, y_exp, atol=1e-6, rtol=1e-5)
    assert S_new.dtype == torch.float32


def test_sequential_is_step_loop_from_zero_state():
    """With no initial state the scan starts from zeros: the first output is dt*(x⊗B)·C + Dx."""
    inputs = make_inputs(3, 2, with_init=False, seed=5)
    y, _ = ssd_sequential(**inputs)
    x, dt, Bm, Cm, D = (inputs[k] for k in ("x", "dt", "B", "C", "D"))
    Bh = Bm[:, 0].repeat_interleave(2, dim=1)  # [b, h, n], h // g = 2
    Ch = Cm[:, 0].repeat_interleave(2, dim=1)
    y0 = dt[:, 0, :, None] * x[:, 0] * (Bh * Ch).sum(-1)[..., None] + D[:, None] * x[:, 0]
    torch.testing.assert_close(y[:, 0], y0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", ["chunked", "sequential"])
def test_bf16_inputs(fn):
    inputs = make_inputs(100, 2, seed=21)
    bf = {k: None if v is None else v.to(torch.bfloat16) for k, v in inputs.items()}
    # fp32 run on the very same (bf16-rounded) values.
    up = {k: None if v is None else v.float() for k, v in bf.items()}
    if fn == "chunked":
        y, s = ssd_chunked(**bf, chunk_size=16)
        y32, s32 = ssd_chunked(**up, chunk_size=16)
    else:
        y, s = ssd_sequential(**bf)
        y32, s32 = ssd_sequential(**up)
    assert y.dtype == torch.bfloat16
    assert s.dtype == torch.float32
    assert y32.dtype == torch.float32
    # Accumulation is in fp32: only the final rounding of y to bf16 differs.
    torch.testing.assert_close(s, s32, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fn", ["chunked", "sequential"])
def test_autocast_does_not_lower_the_precision(fn):
    """DESIGN.md §8.5: under bf16 autocast the scan still runs in float32."""
    inputs = make_inputs(100, 2, seed=23)
    run = (lambda: ssd_chunked(**inputs, chunk_size=16)) if fn == "chunked" else (lambda: ssd_sequential(**inputs))
    y32, s32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = run()
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(y, y32, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s, s32, atol=1e-6, rtol=1e-6)


def test_bf16_close_to_fp32_inputs():
    """bf16 inputs give a result close to the fp32 computation on the unrounded inputs."""
    inputs = make_inputs(63, 2, seed=22)
    bf = {k: None if v is None else v.to(torch.bfloat16) for k, v in inputs.items()}
    y, s = ssd_chunked(**bf, chunk_size=16)
    y32, s32 = ssd_chunked(**inputs, chunk_size=16)
    scale = y32.abs().max().item()
    torch.testing.assert_close(y.float(), y32, atol=3e-2 * scale, rtol=5e-2)
    torch.testing.assert_close(s, s32, atol=3e-2 * s32.abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_sequential])
def test_heads_not_multiple_of_groups(fn):
    inputs = make_inputs(4, 3, seed=0)  # h = 4, g = 3
    with pytest.raises(ValueError):
        fn(**inputs)


@pytest.mark.parametrize("bad_shape", [(B_, 4), (B_, 4, H + 1), (B_, 5, H), (B_, 4, H, 1)])
@pytest.mark.parametrize("fn", [ssd_chunked, ssd_sequential])
def test_bad_dt_shape(fn, bad_shape):
    inputs = make_inputs(4, 2, seed=0)
    inputs["dt"] = torch.full(bad_shape, 0.01)
    with pytest.raises(ValueError):
        fn(**inputs)


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_sequential])
def test_bad_other_shapes(fn):
    inputs = make_inputs(4, 2, seed=0)
    with pytest.raises(ValueError):
        fn(**{**inputs, "A": torch.full((H + 1,), -1.0)})
    with pytest.raises(ValueError):
        fn(**{**inputs, "C": inputs["C"][..., :-1]})
    with pytest.raises(ValueError):
        fn(**{**inputs, "x": inputs["x"][0]})


def test_bad_chunk_size():
    with pytest.raises(ValueError):
        ssd_chunked(**make_inputs(4, 2), chunk_size=0)


def test_chunked_traces_as_one_graph_under_torch_compile():
    """No host read (``.item()``, a Python scalar from a tensor) inside the SSD: under
    ``torch.compile`` each one would break the graph at every layer's call."""
    torch._dynamo.reset()
    inputs = make_inputs(100, 2)
    explained = torch._dynamo.explain(ssd_chunked)(**inputs, chunk_size=32)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_chunked_compiles_to_the_eager_outputs_and_gradients():
    """Under ``torch.compile`` (fullgraph, AOT autograd) the chunk scan's Function gives the eager
    outputs and gradients. PyTorch 2.11 compiled a Function whose forward modified its output in
    place to wrong gradients (pytorch/pytorch#180642)."""
    inputs = make_inputs(100, 2)
    torch.compiler.reset()
    compiled = torch.compile(ssd_chunked, backend="aot_eager", fullgraph=True)
    y, state, grads = run_with_grads(compiled, inputs, chunk_size=32)
    y_ref, state_ref, grads_ref = run_with_grads(ssd_chunked, inputs, chunk_size=32)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_chunked_keeps_no_float32_copy_of_bf16_x(saved_for_backward):
    """The D skip computes in float32 from bf16 ``x`` without keeping a float32 copy of it
    for the backward (``x`` itself is kept)."""
    inputs = make_inputs(64, 2, seed=24, dtype=torch.bfloat16)
    leaves = {k: None if v is None else v.requires_grad_() for k, v in inputs.items()}
    saved = saved_for_backward(lambda: ssd_chunked(**leaves, chunk_size=16))
    x = leaves["x"]
    assert not [t for t in saved if t.shape == x.shape and t.dtype == torch.float32]
    assert [t for t in saved if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()]
