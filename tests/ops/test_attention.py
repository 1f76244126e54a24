"""Union attention (DESIGN.md §3.3, §4, §8.2): chunked fast path, dense reference, decode step,
and an independent per-query computation that uses neither implementation's masks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from bmojo.ops import attention_continued, union_attention_chunked, union_attention_reference, union_attention_step
from bmojo.ops.attention import (
    DENSE_WINDOW_MAX_LEN,
    dense_window_is_faster,
    union_attention_blocks,
    union_attention_for,
)

B_, H, DH = 2, 4, 8
GRAD_NAMES = ("q", "k", "v", "kf", "vf", "mem_k", "mem_v", "q_mem")


def make_inputs(
    l: int,
    hkv: int,
    fading_span: int,
    capacity: int | None,
    chunk_size: int,
    *,
    seed: int = 0,
    b: int = B_,
    h: int = H,
    dh: int = DH,
    with_q_mem: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Random q/k/v, fading k/v (when ``fading_span > 0``) and a per-chunk memory with
    positions uniform in ``[-1, l)`` (``capacity=None``: no memory at all)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, l, h, dh, generator=gen)
    k = torch.randn(b, l, hkv, dh, generator=gen)
    v = torch.randn(b, l, hkv, dh, generator=gen)
    out = {"q": q, "k": k, "v": v, "kf": None, "vf": None}
    out.update(mem_k=None, mem_v=None, mem_pos=None, q_mem=None)
    if fading_span > 0:
        out["kf"] = torch.randn(b, l, hkv, dh, generator=gen)
        out["vf"] = torch.randn(b, l, hkv, dh, generator=gen)
    if capacity is not None:
        nq = math.ceil(l / chunk_size)
        out["mem_k"] = torch.randn(b, nq, capacity, hkv, dh, generator=gen)
        out["mem_v"] = torch.randn(b, nq, capacity, hkv, dh, generator=gen)
        out["mem_pos"] = torch.randint(-1, l, (b, nq, capacity), generator=gen)
        if with_q_mem:
            out["q_mem"] = torch.randn(b, l, h, dh, generator=gen)
    return out


def run_with_grads(fn, inputs, seed: int = 1, **kwargs):
    leaves = {
        name: (None if t is None or name == "mem_pos" else t.detach().clone().requires_grad_(True))
        for name, t in inputs.items()
    }
    leaves["mem_pos"] = inputs["mem_pos"]
    out = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen).to(out.device)
    names = [n for n in GRAD_NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(
        (out * go).sum(), [leaves[n] for n in names], allow_unused=True, materialize_grads=True
    )
    return out.detach(), dict(zip(names, grads, strict=True))


def assert_same(inputs, atol=1e-5, fast=union_attention_chunked, **kwargs):
    out_ref, g_ref = run_with_grads(union_attention_reference, inputs, **kwargs)
    out, grads = run_with_grads(fast, inputs, **kwargs)
    assert out.shape == inputs["q"].shape
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=1e-4)
    assert grads.keys() == g_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], g_ref[name], atol=atol, rtol=1e-4, msg=name)
    return out_ref, g_ref


# (l, chunk_size, hkv): chunk sizes that do not divide l; both GQA ratios (h=4: hkv=2 and 1).
LENGTHS = [(1, 4, 2), (2, 3, 1), (63, 8, 1), (100, 16, 2)]


@pytest.mark.parametrize(("l", "chunk_size", "hkv"), LENGTHS)
@pytest.mark.parametrize("capacity", [0, 4, 8])
@pytest.mark.parametrize("fading_span", [0, 1, 5])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_chunked_matches_reference(window, fading_span, capacity, l, chunk_size, hkv):
    seed = 1000 * window + 100 * fading_span + 10 * capacity + hkv + 7 * l + chunk_size
    inputs = make_inputs(l, hkv, fading_span, capacity, chunk_size, seed=seed)
    _, g_ref = assert_same(inputs, window=window, fading_span=fading_span, chunk_size=chunk_size)
    # Sanity: every key set that should receive gradient does receive it.
    assert g_ref["v"].abs().sum() > 0
    if fading_span > 0 and l > window:
        assert g_ref["vf"].abs().sum() > 0
    if capacity > 0 and l > 2 * window:
        assert g_ref["mem_v"].abs().sum() > 0


@pytest.mark.parametrize(("l", "chunk_size", "hkv"), [(1, 4, 1), (63, 8, 2), (100, 7, 1)])
@pytest.mark.parametrize("fading_span", [0, 5])
@pytest.mark.parametrize("window", [1, 8])
def test_chunked_matches_reference_without_memory(window, fading_span, l, chunk_size, hkv):
    inputs = make_inputs(l, hkv, fading_span, None, chunk_size, seed=window + 3 * fading_span + l)
    assert_same(inputs, window=window, fading_span=fading_span, chunk_size=chunk_size)


@pytest.mark.parametrize(("l", "chunk_size", "hkv"), [(1, 4, 1), (63, 8, 2), (100, 7, 1)])
@pytest.mark.parametrize("window", [1, 8])
def test_blocks_match_reference_for_plain_window(window, l, chunk_size, hkv):
    """Short plain-window sequences go to the band-masked SDPA; the blocked path they skip
    must still be right."""
    inputs = make_inputs(l, hkv, 0, None, chunk_size, seed=window + 5 * l)
    assert_same(inputs, window=window, chunk_size=chunk_size, fast=union_attention_blocks)


@pytest.mark.parametrize("window", [3, 100])
def test_plain_window_on_both_sides_of_the_dense_limit(window):
    """The dispatch rule sends these to the band-masked SDPA and to the blocks respectively;
    both equal the reference."""
    short, long = DENSE_WINDOW_MAX_LEN, max(DENSE_WINDOW_MAX_LEN, 4 * window) + 1
    assert dense_window_is_faster(short, window) and not dense_window_is_faster(long, window)
    for l in (short, long):
        inputs = make_inputs(l, 2, 0, None, 16, seed=l + window)
        assert_same(inputs, window=window, chunk_size=16)


def test_blocks_need_a_window():
    with pytest.raises(ValueError, match="finite window"):
        union_attention_blocks(**make_inputs(8, 2, 0, None, 4), window=None, chunk_size=4)


def test_memory_without_q_mem_uses_q():
    inputs = make_inputs(40, 2, 2, 6, 8, seed=3, with_q_mem=False)
    assert_same(inputs, window=4, fading_span=2, chunk_size=8)
    # The result depends on the memory (so the memory was actually scored with q).
    no_mem = {**inputs, "mem_k": None, "mem_v": None, "mem_pos": None}
    with_mem = union_attention_reference(**inputs, window=4, fading_span=2, chunk_size=8)
    without = union_attention_reference(**no_mem, window=4, fading_span=2, chunk_size=8)
    assert not torch.allclose(with_mem, without)


def test_scale_argument():
    inputs = make_inputs(30, 2, 3, 4, 8, seed=4)
    assert_same(inputs, window=5, fading_span=3, chunk_size=8, scale=0.7)


@pytest.mark.parametrize(("l", "chunk_size"), [(1, 4), (2, 3), (63, 8), (100, 16)])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_full_causal_matches_reference(hkv, l, chunk_size):
    inputs = make_inputs(l, hkv, 0, None, chunk_size, seed=l + 10 * hkv)
    assert_same(inputs, window=None, chunk_size=chunk_size)


def test_full_causal_scale_argument():
    inputs = make_inputs(37, 2, 0, None, 8, seed=6)
    assert_same(inputs, window=None, chunk_size=8, scale=0.9)


def test_window_at_least_length_equals_full_causal():
    inputs = make_inputs(50, 2, 0, None, 16, seed=5)
    full = union_attention_reference(**inputs, window=None)
    torch.testing.assert_close(
        union_attention_chunked(**inputs, window=50, chunk_size=16), full, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        union_attention_chunked(**inputs, window=80, chunk_size=16), full, atol=1e-5, rtol=1e-4
    )


def visible_keys_by_hand(i, window, fading_span, chunk_size, mem_pos_b):
    """DESIGN.md §3.3 for query ``i``, written as plain Python: a list of
    ``(kind, index)`` with kind ``raw`` (index = position), ``fading`` (position) or
    ``mem`` (slot of the query chunk's memory)."""
    keys = []
    for j in range(0, i + 1):
        if i - window + 1 <= j <= i:
            keys.append(("raw", j))
    for j in range(0, i + 1):
        if i - window - fading_span + 1 <= j <= i - window:
            keys.append(("fading", j))
    c = i // chunk_size
    for slot, t in enumerate(mem_pos_b[c].tolist()):
        if t != -1 and t <= i - window:
            keys.append(("mem", slot))
    return keys


@pytest.mark.parametrize("hkv", [2, 1])
def test_independent_per_query(hkv):
    l, window, fading_span, chunk_size, capacity = 23, 3, 2, 5, 4
    inputs = make_inputs(l, hkv, fading_span, capacity, chunk_size, seed=42 + hkv)
    q, k, v, kf, vf = (inputs[n] for n in ("q", "k", "v", "kf", "vf"))
    mem_k, mem_v, mem_pos, q_mem = (inputs[n] for n in ("mem_k", "mem_v", "mem_pos", "q_mem"))
    kwargs = dict(window=window, fading_span=fading_span, chunk_size=chunk_size)
    out_ref = union_attention_reference(**inputs, **kwargs)
    out_chunked = union_attention_chunked(**inputs, **kwargs)
    group = H // hkv
    n_mem_seen = 0
    for b in range(B_):
        for i in range(l):
            keys = visible_keys_by_hand(i, window, fading_span, chunk_size, mem_pos[b])
            n_mem_seen += sum(kind == "mem" for kind, _ in keys)
            for head in range(H):
                kh = head // group
                logits, vals = [], []
                for kind, idx in keys:
                    if kind == "raw":
                        logits.append(float(q[b, i, head] @ k[b, idx, kh]))
                        vals.append(v[b, idx, kh])
                    elif kind == "fading":
                        logits.append(float(q[b, i, head] @ kf[b, idx, kh]))
                        vals.append(vf[b, idx, kh])
                    else:
                        c = i // chunk_size
                        logits.append(float(q_mem[b, i, head] @ mem_k[b, c, idx, kh]))
                        vals.append(mem_v[b, c, idx, kh])
                logits = [s / math.sqrt(DH) for s in logits]
                top = max(logits)
                weights = [math.exp(s - top) for s in logits]
                total = sum(weights)
                expected = sum(w / total * val for w, val in zip(weights, vals, strict=True))
                torch.testing.assert_close(out_ref[b, i, head], expected, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(out_chunked[b, i, head], expected, atol=1e-5, rtol=1e-4)
    assert n_mem_seen > 0  # the case actually exercises the memory


def test_independent_full_causal():
    l, hkv = 9, 2
    inputs = make_inputs(l, hkv, 0, None, 4, seed=8)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out = union_attention_chunked(**inputs, window=None, chunk_size=4)
    group = H // hkv
    for i in range(l):
        for head in range(H):
            for b in range(B_):
                kh = head // group
                s = k[b, : i + 1, kh] @ q[b, i, head] / math.sqrt(DH)  # [i+1]
                expected = torch.softmax(s, dim=-1) @ v[b, : i + 1, kh]
                torch.testing.assert_close(out[b, i, head], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_shape", ["[s]", "[b, s]"])
@pytest.mark.parametrize(
    ("window", "fading_span", "capacity"), [(3, 2, 4), (1, 0, 0), (4, 4, None)]
)
@pytest.mark.parametrize("hkv", [2, 1])
def test_step_matches_reference_rows(hkv, window, fading_span, capacity, mask_shape):
    """Decode every position as a step against a fixed-size cache (``W`` raw slots then ``F``
    fading slots, the slots before position 0 holding garbage marked invisible)."""
    l, chunk_size = 19, 4
    inputs = make_inputs(l, hkv, fading_span, capacity, chunk_size, seed=100 + window + hkv)
    q, k, v, kf, vf = (inputs[n] for n in ("q", "k", "v", "kf", "vf"))
    mem_k, mem_v, mem_pos, q_mem = (inputs[n] for n in ("mem_k", "mem_v", "mem_pos", "q_mem"))
    ref = union_attention_reference(
        **inputs, window=window, fading_span=fading_span, chunk_size=chunk_size
    )
    gen = torch.Generator().manual_seed(7)
    for i in range(l):
        raw_pos = list(range(i - window + 1, i + 1))
        fad_pos = list(range(i - window - fading_span + 1, i - window + 1))
        garbage = torch.randn(B_, window + fading_span, hkv, DH, generator=gen) * 5
        ck, cv = garbage.clone(), garbage.clone().flip(0)
        visible = torch.zeros(window + fading_span, dtype=torch.bool)
        for slot, j in enumerate(raw_pos):
            if j >= 0:
                ck[:, slot], cv[:, slot], visible[slot] = k[:, j], v[:, j], True
        for slot, j in enumerate(fad_pos, start=window):
            if j >= 0:
                ck[:, slot], cv[:, slot], visible[slot] = kf[:, j], vf[:, j], True
        if mask_shape == "[b, s]":
            visible = visible.expand(B_, -1).clone()
        step_kwargs = {}
        if capacity is not None:
            c = i // chunk_size
            pos_c = mem_pos[:, c]
            step_kwargs = dict(
                q_mem=q_mem[:, i],
                mem_k=mem_k[:, c],
                mem_v=mem_v[:, c],
                mem_visible=(pos_c >= 0) & (pos_c <= i - window),
            )
        out = union_attention_step(q[:, i], ck, cv, visible, **step_kwargs)
        assert out.shape == (B_, H, DH)
        torch.testing.assert_close(out, ref[:, i], atol=1e-5, rtol=1e-4, msg=f"position {i}")


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize(("l", "start"), [(1, 5), (7, 1), (40, 23), (90, 10)])
def test_continued_matches_reference_rows(l, start, window, hkv):
    """New queries at ``start ..`` against the past keys a cache holds (all of them for full
    attention, the last ``window`` for a window) and their own: the rows ``start ..`` of the
    whole sequence's reference, outputs and gradients of the new q, k, v."""
    inputs = make_inputs(start + l, hkv, 0, None, 4, seed=l + start)
    n_past = start if window is None else min(start, window)
    whole = {name: inputs[name].clone().requires_grad_(True) for name in ("q", "k", "v")}
    ref = union_attention_reference(whole["q"], whole["k"], whole["v"], window, chunk_size=4)[:, start:]
    new = {name: inputs[name][:, start:].clone().requires_grad_(True) for name in ("q", "k", "v")}
    out = attention_continued(new["q"], new["k"], new["v"], inputs["k"][:, start - n_past: start],
                              inputs["v"][:, start - n_past: start], window, chunk_size=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * go).sum(), list(new.values()))
    ref_grads = torch.autograd.grad((ref * go).sum(), list(whole.values()))
    for name, grad, ref_grad in zip(new, grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad[:, start:], atol=1e-5, rtol=1e-4, msg=name)


def test_causality():
    """Output at i does not change when inputs at j > i change (DESIGN.md §8.1)."""
    l, chunk_size, i0 = 30, 8, 17
    inputs = make_inputs(l, 2, 3, 4, chunk_size, seed=9)
    # Memory entries are positions < i0 - W for chunk of i0 ... only raw inputs are perturbed.
    kwargs = dict(window=4, fading_span=3, chunk_size=chunk_size)
    base = union_attention_chunked(**inputs, **kwargs)
    changed = dict(inputs)
    for name in ("q", "k", "v", "kf", "vf", "q_mem"):
        t = inputs[name].clone()
        t[:, i0 + 1 :] = torch.randn_like(t[:, i0 + 1 :])
        changed[name] = t
    after = union_attention_chunked(**changed, **kwargs)
    torch.testing.assert_close(after[:, : i0 + 1], base[:, : i0 + 1], atol=0, rtol=0)
    assert not torch.allclose(after[:, i0 + 1 :], base[:, i0 + 1 :])


def test_bf16_output_dtype():
    inputs = make_inputs(20, 2, 2, 4, 8, seed=12)
    bf = {n: t if t is None or n == "mem_pos" else t.to(torch.bfloat16) for n, t in inputs.items()}
    kwargs = dict(window=3, fading_span=2, chunk_size=8)
    out = union_attention_chunked(**bf, **kwargs)
    ref = union_attention_reference(**bf, **kwargs)
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    up = {n: t if t is None or n == "mem_pos" else t.float() for n, t in bf.items()}
    ref32 = union_attention_reference(**up, **kwargs)
    torch.testing.assert_close(out.float(), ref32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ref.float(), ref32, atol=3e-2, rtol=3e-2)


def test_bf16_gradients_match_the_fp32_reference():
    inputs = make_inputs(40, 2, 4, 6, 8, seed=13)
    kwargs = dict(window=5, fading_span=4, chunk_size=8)  # blocked path: raw window, fading tokens and memory
    bf = {n: t if t is None or n == "mem_pos" else t.to(torch.bfloat16) for n, t in inputs.items()}
    out, grads = run_with_grads(union_attention_chunked, bf, **kwargs)
    up = {n: t if t is None or n == "mem_pos" else t.float() for n, t in bf.items()}
    out32, grads32 = run_with_grads(union_attention_reference, up, **kwargs)
    assert out.dtype == torch.bfloat16 and grads.keys() == grads32.keys() and len(grads) == len(GRAD_NAMES)
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(grad.float(), grads32[name], atol=5e-2, rtol=5e-2, msg=name)


def test_blocked_path_keeps_neither_gathered_keys_nor_float32_probabilities(saved_for_backward):
    """Under bf16 the backward keeps the probabilities in bf16 (the largest saved tensor), one
    contiguous tensor per key set (a bf16 batched matmul on the CPU would copy a slice of a wider
    row), and regathers each block's keys and values (each position several times over) instead
    of keeping them."""
    l, C, W, Fs, M = 64, 8, 8, 8, 4
    inputs = make_inputs(l, 2, Fs, M, C, seed=14)
    leaves = {n: t if t is None or n == "mem_pos" else t.to(torch.bfloat16).requires_grad_() for n, t in inputs.items()}
    saved = saved_for_backward(lambda: union_attention_chunked(**leaves, window=W, fading_span=Fs, chunk_size=C))
    nq = l // C
    keys_per_block = 4 * C  # W = F = C: raw keys from blocks n-1 and n, fading keys from n-2 and n-1
    rows = (B_ * 2 * nq, H // 2 * C)  # (b * hkv * nq, group * C): every query block's queries
    probabilities = {t.shape[-1]: t for t in saved if t.shape[:-1] == rows}
    assert probabilities.keys() == {keys_per_block, M, DH}  # the raw and fading keys', the memory's; the output
    for keys in (keys_per_block, M):
        assert probabilities[keys].dtype == torch.bfloat16 and probabilities[keys].is_contiguous()
    gathered = B_ * 2 * nq * keys_per_block * DH  # b * hkv * nq * K * dh: the keys (or values) of all blocks
    assert not [t for t in saved if t.numel() == gathered], [t.shape for t in saved]
    assert all(t.dtype == torch.bfloat16 for t in saved)


@pytest.mark.parametrize("fn", [union_attention_chunked, union_attention_reference])
def test_invalid_arguments(fn):
    inputs = make_inputs(10, 2, 2, 4, 4, seed=0)
    no_extra = {**inputs, "kf": None, "vf": None, "mem_k": None, "mem_v": None, "mem_pos": None}
    with pytest.raises(ValueError):  # h not a multiple of hkv
        fn(
            **{
                **no_extra,
                "k": inputs["k"][:, :, :1].expand(-1, -1, 3, -1),
                "v": inputs["v"][:, :, :1].expand(-1, -1, 3, -1),
            },
            window=2,
        )
    with pytest.raises(ValueError):
        fn(**no_extra, window=0)
    with pytest.raises(ValueError):  # fading needs kf, vf
        fn(**no_extra, window=2, fading_span=2)
    with pytest.raises(ValueError):  # fading needs a finite window
        fn(**{**no_extra, "kf": inputs["kf"], "vf": inputs["vf"]}, window=None, fading_span=2)
    with pytest.raises(ValueError):  # memory per chunk: wrong number of chunks
        fn(**inputs, window=2, fading_span=2, chunk_size=3)


def test_kernel_choice_by_name():
    assert union_attention_for("torch") is union_attention_chunked
    with pytest.raises(ValueError, match="attention_kernel='flash' is invalid"):
        union_attention_for("flash")


def test_triton_kernel_without_triton_is_a_value_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bmojo.ops.attention_triton", None)  # an import of it raises ImportError
    with pytest.raises(ValueError, match="attention_kernel='triton': "):
        union_attention_for("triton")


def test_blocks_compile_as_one_graph_to_the_eager_result():
    """Under ``torch.compile`` (fullgraph: no break; AOT autograd, no C++ compiler needed) the
    blocked path with every key set, its hand-written backward included, gives the eager output
    and gradients (to the rounding of reordered float32 sums)."""
    inputs = make_inputs(50, 2, 5, 3, 8, seed=12)
    kwargs = dict(window=6, fading_span=5, chunk_size=8)
    torch.compiler.reset()
    compiled = torch.compile(union_attention_blocks, backend="aot_eager", fullgraph=True)
    out, grads = run_with_grads(compiled, inputs, **kwargs)
    out_ref, grads_ref = run_with_grads(union_attention_blocks, inputs, **kwargs)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
