"""The B'MOJO mixer (DESIGN.md §3, §4, §7, §8).

The reference here is a plain per-query implementation written from the spec: its own
projections, QK norm, RoPE, innovation scores, per-chunk selection and memory policies
(Python lists and sets), and one softmax per query over the raw window, the fading tokens
and the visible eidetic entries. Only the SSM output ``f`` (tested in ``test_mamba2.py``),
``rope_angles``/``apply_rope`` and the seeded hash of ``selection="random"`` are reused.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bmojo.layers import Attention, BMojoMixer
from bmojo.ops import eidetic_memory_sequential, selection_scores
from bmojo.ops.rope import apply_rope, rope_angles

D_MODEL, H = 32, 4
DH = D_MODEL // H
W, FS, C, K, M = 4, 3, 4, 2, 4
L = 50  # several times W + F + M
BATCH = 2
SEED_RANDOM_SELECTION = 3
POLICIES = ["fifo", "score"]
ROPES = ["none", "absolute", "window_edge"]
# "topk" with and without innovation threshold, and the two ablations without innovation.
SELECTIONS = ["topk", "topk+tau", "random", "recent"]


def make_mixer(seed: int = 0, *, n_kv_heads: int = 2, window: int = W, fading_span: int = FS,
               chunk_size: int = C, k: int = K, capacity: int = M, policy: str = "score",
               selection: str = "topk", threshold: float | None = None, rope: str = "none",
               qk_norm: bool = True, ssm_residual: bool = True, tie: bool = True,
               rank: int = 0, qkv_conv: int = 0) -> BMojoMixer:
    torch.manual_seed(seed)
    mixer = BMojoMixer(
        D_MODEL, H, n_kv_heads, window=window, fading_span=fading_span, chunk_size=chunk_size,
        eidetic_per_chunk=k, eidetic_capacity=capacity, eidetic_policy=policy,
        selection=selection, innovation_threshold=threshold, eidetic_rope=rope,
        selection_seed=SEED_RANDOM_SELECTION, innovation_rank=rank, ssm_residual=ssm_residual,
        tie_fading_proj=tie, qk_norm=qk_norm, d_state=8, ssm_headdim=16, qkv_conv=qkv_conv,
    )
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith("norm.weight"):  # q_norm, k_norm, ssm.norm: not all ones
                p.uniform_(0.5, 1.5)
        if mixer.predictor is not None:  # zero init would make x̂ = 0
            for p in mixer.predictor.parameters():
                p.normal_(0.0, 0.1)
    return mixer.eval()


def make_input(length: int = L, seed: int = 1, b: int = BATCH) -> torch.Tensor:
    """Tokens of varied norm, so that innovation scores are spread out."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(b, length, 1, generator=gen)
    return torch.randn(b, length, D_MODEL, generator=gen) * scale


# ------------------------------------------------------------------ plain reference


def hand_scores(mixer: BMojoMixer, x: torch.Tensor) -> torch.Tensor:
    """Selection score of every position ``[B, L]``: the innovation
    ``||x_t - Φ(f_{t-1})||² / D`` for ``topk``."""
    b, length, d = x.shape
    with torch.no_grad():
        if mixer.selection == "topk":
            f = mixer.ssm(x)
            f_prev = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)
            x_hat = mixer.predictor(f_prev)
            return (x - x_hat).pow(2).sum(-1) / d
        positions = torch.arange(length)
        if mixer.selection == "recent":
            return positions.float().expand(b, length).clone()
        return selection_scores(torch.zeros(b, length), positions, "random", SEED_RANDOM_SELECTION)


def hand_select(score: torch.Tensor, chunk: int, k: int, tau: float | None):
    """Per complete chunk, the k best (score desc, then position asc); a selected slot with
    score <= tau is empty. Returns ``(sel_pos, sel_score)`` tensors ``[B, nc, k]``."""
    b, length = score.shape
    nc = length // chunk
    sel_pos = torch.full((b, nc, k), -1, dtype=torch.long)
    sel_score = torch.full((b, nc, k), float("-inf"))
    for bi, c in itertools.product(range(b), range(nc)):
        cands = sorted(range(c * chunk, (c + 1) * chunk), key=lambda t: (-float(score[bi, t]), t))
        for slot, t in enumerate(cands[:k]):
            if tau is None or float(score[bi, t]) > tau:
                sel_pos[bi, c, slot] = t
                sel_score[bi, c, slot] = score[bi, t]
    return sel_pos, sel_score


def hand_memory(sel_pos: torch.Tensor, sel_score: torch.Tensor, capacity: int,
                policy: str) -> list[list[set[int]]]:
    """``memory[b][c]``: positions in the eidetic memory seen by chunk ``c`` (after chunks
    ``0..c-1`` completed)."""
    b, nc, k = sel_pos.shape
    out = []
    for bi in range(b):
        per_chunk = []
        for c in range(nc + 1):
            if policy == "fifo":  # the selections of the last M/k chunks
                chunks = range(max(0, c - capacity // k), c)
                kept = {int(p) for cc in chunks for p in sel_pos[bi, cc] if p >= 0}
            else:  # the M best-ranked selections so far
                entries = [(-float(s), int(p)) for cc in range(c)
                           for p, s in zip(sel_pos[bi, cc], sel_score[bi, cc], strict=True)
                           if p >= 0]
                kept = {p for _, p in sorted(entries)[:capacity]}
            per_chunk.append(kept)
        out.append(per_chunk)
    return out


def _rot(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``t [..., n, heads, dh]`` at ``positions [n]``."""
    cos, sin = rope_angles(positions, DH, 10000.0)
    return apply_rope(t, cos, sin)


def plain_bmojo(mixer: BMojoMixer, x: torch.Tensor, tau: float | None = None,
                retrieved: list[list[set[int]]] | None = None) -> torch.Tensor:
    """Per-query union softmax from the spec; differentiable in ``x`` and the weights.
    ``retrieved[b][c]``: positions retrieved from storage for chunk ``c`` (DESIGN.md §5),
    joined to the eidetic memory (a set: a token enters the softmax once)."""
    b, length, _ = x.shape
    Wn, Fs, Cs = mixer.window, mixer.fading_span, mixer.chunk_size
    hkv = mixer.n_kv_heads
    group = H // hkv
    f = mixer.ssm(x)

    def norm(t, module):
        if module is None:
            return t
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * module.weight

    q, k, v = x @ mixer.q_proj.weight.T, x @ mixer.k_proj.weight.T, x @ mixer.v_proj.weight.T
    if mixer.qkv_conv is not None:  # channel c at t: bias[c] + sum_j w[c, K-1-j] x[t-j, c], zeros before 0
        qkv = torch.cat([q, k, v], -1)
        w, width = mixer.qkv_conv.weight[:, 0], mixer.qkv_conv.weight.shape[-1]
        bias = mixer.qkv_conv.bias
        conv = torch.stack([bias + sum(w[:, width - 1 - j] * qkv[:, t - j] for j in range(min(width, t + 1)))
                            for t in range(length)], 1)
        q, k, v = conv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
    q = norm(q.reshape(b, length, H, DH), mixer.q_norm)
    k = norm(k.reshape(b, length, hkv, DH), mixer.k_norm)
    v = v.reshape(b, length, hkv, DH)
    wkf = (mixer.kf_proj or mixer.k_proj).weight
    wvf = (mixer.vf_proj or mixer.v_proj).weight
    kf = norm((f @ wkf.T).reshape(b, length, hkv, DH), mixer.k_norm)
    vf = (f @ wvf.T).reshape(b, length, hkv, DH)
    pos = torch.arange(length)
    q_rot, k_rot, kf_rot = _rot(q, pos), _rot(k, pos), _rot(kf, pos)
    memory = None
    if mixer.eidetic_capacity > 0:
        sel = hand_select(hand_scores(mixer, x), Cs, mixer.eidetic_per_chunk, tau)
        memory = hand_memory(*sel, mixer.eidetic_capacity, mixer.eidetic_policy)

    def expand(t):  # [n, hkv, dh] -> [n, H, dh]
        return t.repeat_interleave(group, dim=1)

    rows = []
    for bi in range(b):
        outs = []
        for i in range(length):
            raw = list(range(max(0, i - Wn + 1), i + 1))
            logits = [(q_rot[bi, i] * expand(k_rot[bi, raw])).sum(-1)]  # [n, H]
            values = [expand(v[bi, raw])]
            fad = list(range(max(0, i - Wn - Fs + 1), i - Wn + 1)) if Fs > 0 else []
            if fad:
                logits.append((q_rot[bi, i] * expand(kf_rot[bi, fad])).sum(-1))
                values.append(expand(vf[bi, fad]))
            past = (memory[bi][i // Cs] if memory else set()) | (retrieved[bi][i // Cs] if retrieved else set())
            mem = sorted(t for t in past if t <= i - Wn)
            if mem:
                if mixer.eidetic_rope == "none":
                    qe, ke = q[bi, i], k[bi, mem]
                elif mixer.eidetic_rope == "absolute":
                    qe, ke = q_rot[bi, i], k_rot[bi, mem]
                else:  # as if the key were at position i - W - F
                    qe = q_rot[bi, i]
                    ke = _rot(k[bi, mem], torch.full((len(mem),), i - Wn - Fs))
                logits.append((qe * expand(ke)).sum(-1))
                values.append(expand(v[bi, mem]))
            probs = torch.softmax(torch.cat(logits) * DH**-0.5, dim=0)  # [n, H]
            outs.append((probs[..., None] * torch.cat(values)).sum(0).reshape(H * DH))
        rows.append(torch.stack(outs))
    y = torch.stack(rows) @ mixer.o_proj.weight.T
    return y + f if mixer.ssm_residual else y


def _selection_kwargs(selection: str, mixer_factory, x: torch.Tensor) -> dict:
    """Constructor arguments for a selection variant; ``topk+tau`` uses the median
    innovation of ``x`` as threshold, so that about half of the selected slots stay empty."""
    if selection != "topk+tau":
        return {"selection": selection}
    scores = hand_scores(mixer_factory(selection="topk"), x)
    return {"selection": "topk", "threshold": float(scores.median())}


# ------------------------------------------------------------------ parallel vs plain


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_forward_equals_plain(policy: str, rope: str, selection: str, n_kv_heads: int) -> None:
    x = make_input(seed=2)

    def factory(**kw):
        return make_mixer(seed=4, n_kv_heads=n_kv_heads, policy=policy, rope=rope, **kw)

    kwargs = _selection_kwargs(selection, factory, x)
    mixer = factory(**kwargs)
    with torch.no_grad():
        expected = plain_bmojo(mixer, x, kwargs.get("threshold"))
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("fading_span", "capacity", "tie", "ssm_residual", "qk_norm"),
    [(0, 0, True, False, False), (3, 0, True, True, True), (0, 4, True, True, True),
     (3, 4, False, False, True), (5, 8, True, True, False)],
)
def test_forward_equals_plain_other_configs(fading_span: int, capacity: int, tie: bool,
                                            ssm_residual: bool, qk_norm: bool) -> None:
    mixer = make_mixer(seed=5, fading_span=fading_span, capacity=capacity, tie=tie,
                       ssm_residual=ssm_residual, qk_norm=qk_norm, rope="window_edge")
    x = make_input(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x), atol=1e-5, rtol=1e-5)


GEOMETRIES = [  # (window, fading_span, chunk_size, k, capacity, policy, rope)
    (3, 5, 6, 3, 9, "score", "window_edge"),  # C > W, k = C/2
    (6, 2, 3, 1, 2, "fifo", "absolute"),  # C < W
    (2, 2, 5, 5, 10, "score", "none"),  # k = C: the M most surprising tokens
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_other_geometries(geometry: tuple) -> None:
    window, fading_span, chunk_size, k, capacity, policy, rope = geometry
    mixer = make_mixer(seed=16, window=window, fading_span=fading_span, chunk_size=chunk_size, k=k,
                       capacity=capacity, policy=policy, rope=rope)
    x = make_input(45, seed=17)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x), atol=1e-5, rtol=1e-5)
    for prefix in (0, 11):
        _check_decoding(mixer, x, prefix, None, checkpoints=(20, 45))


@pytest.mark.parametrize("length", [1, 2, 3, 5])
@pytest.mark.parametrize("policy", POLICIES)
def test_short_sequences(policy: str, length: int) -> None:
    mixer = make_mixer(seed=18, policy=policy, rope="absolute")
    x = make_input(length, seed=19)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), plain_bmojo(mixer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_equal_plain(policy: str, rope: str) -> None:
    mixer = make_mixer(seed=7, policy=policy, rope=rope)
    x = make_input(30, seed=8).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(BATCH, 30, D_MODEL, generator=torch.Generator().manual_seed(9))
    params = [p for n, p in mixer.named_parameters() if not n.startswith("predictor")]
    got = torch.autograd.grad((mixer(x) * g).sum(), [x, *params])
    want = torch.autograd.grad((plain_bmojo(mixer, x2) * g).sum(), [x2, *params])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------- parallel vs recurrent


def _cache_shapes(cache) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in _cache_tensors(cache).items()}


def _cache_tensors(cache) -> dict:
    out = {"ssm.conv": cache.ssm.conv_state, "ssm.state": cache.ssm.ssm_state,
           "raw.k": cache.raw.k, "raw.pos": cache.raw.pos, "prev_f": cache.prev_f}
    if cache.fading is not None:
        out.update({"fading.k": cache.fading.k, "fading.v": cache.fading.v})
    for name in ("mem_k", "mem_v", "mem_pos", "mem_score", "cand_k", "cand_v", "cand_score", "qkv_conv_state"):
        if getattr(cache, name) is not None:
            out[name] = getattr(cache, name)
    return out


def _memory_sets(mem_pos: torch.Tensor) -> list[set[int]]:
    return [{int(p) for p in row if p >= 0} for row in mem_pos]


def _assert_same_memory(a, b) -> None:
    """Same positions per row, and for each position the same key, value and score."""
    assert _memory_sets(a.mem_pos) == _memory_sets(b.mem_pos)
    for bi in range(a.mem_pos.shape[0]):
        for p in _memory_sets(a.mem_pos[bi:bi + 1])[0]:
            sa = int((a.mem_pos[bi] == p).nonzero()[0, 0])
            sb = int((b.mem_pos[bi] == p).nonzero()[0, 0])
            torch.testing.assert_close(a.mem_k[bi, sa], b.mem_k[bi, sb], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.mem_v[bi, sa], b.mem_v[bi, sb], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.mem_score[bi, sa], b.mem_score[bi, sb], atol=1e-5,
                                       rtol=1e-5)


def _check_decoding(mixer: BMojoMixer, x: torch.Tensor, prefix: int, threshold: float | None,
                    checkpoints: tuple[int, ...] = ()) -> None:
    length = x.shape[1]
    with torch.no_grad():
        full = mixer(x)
        ref_mem = None
        if mixer.has_memory:
            sel = hand_select(hand_scores(mixer, x), mixer.chunk_size, mixer.eidetic_per_chunk,
                              threshold)
            ref_mem, _ = eidetic_memory_sequential(*sel, mixer.eidetic_capacity,
                                                   mixer.eidetic_policy)  # [B, nc + 1, M]
            assert any(_memory_sets(ref_mem[:, -1]))  # the memory does fill up
        cache = mixer.new_cache(BATCH)
        shapes = _cache_shapes(cache)
        outs = [mixer(x[:, :prefix], cache)] if prefix else []
        for t in range(prefix, length):
            if ref_mem is not None:  # memory after positions 0..t-1: chunks < t // C
                expected = _memory_sets(ref_mem[:, t // mixer.chunk_size])
                assert _memory_sets(cache.mem_pos) == expected
            outs.append(mixer.step(x[:, t], cache, t)[:, None])
            assert _cache_shapes(cache) == shapes  # fixed size
            if t + 1 in checkpoints and (mixer.has_memory or mixer.qkv_conv is not None):
                prefill = mixer.new_cache(BATCH)
                mixer(x[:, : t + 1], prefill)
                if mixer.has_memory:
                    _assert_same_memory(prefill, cache)
                    torch.testing.assert_close(prefill.cand_score, cache.cand_score, atol=1e-5,
                                               rtol=1e-5)
                if mixer.qkv_conv is not None:
                    torch.testing.assert_close(prefill.qkv_conv_state, cache.qkv_conv_state)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_parallel_equals_recurrent(policy: str, rope: str, selection: str, n_kv_heads: int) -> None:
    x = make_input(seed=10)

    def factory(**kw):
        return make_mixer(seed=11, n_kv_heads=n_kv_heads, policy=policy, rope=rope, **kw)

    kwargs = _selection_kwargs(selection, factory, x)
    mixer = factory(**kwargs)
    # Pure decoding from an empty cache, and a prefill ending inside a chunk then decoding.
    for prefix in (0, 7):
        _check_decoding(mixer, x, prefix, kwargs.get("threshold"), checkpoints=(17, 34, 50))


@pytest.mark.parametrize("prefix", [1, 3, 4, 8, 13, 26, 49, 50])
def test_prefill_lengths(prefix: int) -> None:
    """Prefill ending inside a chunk, at a chunk boundary, before the window fills, at the end."""
    mixer = make_mixer(seed=12, policy="score", rope="window_edge")
    _check_decoding(mixer, make_input(seed=13), prefix, None, checkpoints=(prefix + 1, 50))


@pytest.mark.parametrize(
    ("fading_span", "capacity", "tie", "ssm_residual"),
    [(0, 0, True, False), (3, 0, True, True), (0, 4, True, True), (3, 4, False, False)],
)
def test_parallel_equals_recurrent_other_configs(fading_span: int, capacity: int, tie: bool,
                                                 ssm_residual: bool) -> None:
    mixer = make_mixer(seed=14, fading_span=fading_span, capacity=capacity, tie=tie,
                       ssm_residual=ssm_residual, policy="fifo", rope="absolute")
    x = make_input(seed=15)
    for prefix in (0, 9):
        _check_decoding(mixer, x, prefix, None, checkpoints=(21,))


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize(("policy", "rope", "capacity"), [("score", "none", M), ("fifo", "window_edge", M),
                                                         ("score", "absolute", 0)])
def test_qkv_conv_forward_gradients_and_decoding(width: int, policy: str, rope: str, capacity: int) -> None:
    """The optional convolution over q, k, v: forward and gradients equal the plain reference
    (which convolves by hand), and prefill + decoding equal the parallel form."""
    mixer = make_mixer(seed=23, policy=policy, rope=rope, capacity=capacity, qkv_conv=width)
    x = make_input(30, seed=24).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(BATCH, 30, D_MODEL, generator=torch.Generator().manual_seed(25))
    params = [p for n, p in mixer.named_parameters() if not n.startswith("predictor")]
    got_y = mixer(x)
    want_y = plain_bmojo(mixer, x2)
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad((got_y * g).sum(), [x, *params])
    want = torch.autograd.grad((want_y * g).sum(), [x2, *params])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    for prefix in (0, 1, 7):
        _check_decoding(mixer, make_input(seed=26), prefix, None, checkpoints=(17, 50))


def test_qkv_conv_prefill_from_position_0_forgets_a_used_cache() -> None:
    """A prefill from position 0 starts the convolution from zeros, whatever the cache held."""
    mixer = make_mixer(seed=29, qkv_conv=4)
    x, other = make_input(20, seed=30), make_input(20, seed=31)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.new_cache(BATCH)
        mixer(other, cache)
        assert cache.qkv_conv_state.abs().sum() > 0
        outs = [mixer(x[:, :9], cache)] + [mixer.step(x[:, t], cache, t)[:, None] for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_qkv_conv_carries_the_previous_token_into_the_key() -> None:
    """With the convolution's taps on the previous position only, the key and value at ``t``
    are the projections of ``x_{t-1}``: what makes one layer's memory hold "the value after
    this key"."""
    mixer = make_mixer(seed=27, qk_norm=False, qkv_conv=2)
    with torch.no_grad():
        mixer.qkv_conv.weight.zero_()
        mixer.qkv_conv.weight[:, 0, 0] = 1.0  # tap 0 of width 2: position t-1
        mixer.qkv_conv.bias.zero_()
        x = make_input(9, seed=28)
        _, q, k, v, *_ = mixer._project(x, 0, None)
        torch.testing.assert_close(k[:, 1:].flatten(-2), mixer.k_proj(x[:, :-1]))
        torch.testing.assert_close(v[:, 1:].flatten(-2), mixer.v_proj(x[:, :-1]))
        assert (k[:, 0] == 0).all() and (q[:, 0] == 0).all()


def test_cache_layout() -> None:
    mixer = make_mixer(seed=16)
    cache = mixer.new_cache(BATCH)
    assert cache.raw.k.shape == (BATCH, W, 2, DH) and not cache.raw.growable
    assert cache.fading.k.shape == (BATCH, W + FS, 2, DH) and not cache.fading.growable
    assert cache.mem_k.shape == cache.mem_v.shape == (BATCH, M, 2, DH)
    assert cache.mem_pos.shape == cache.mem_score.shape == (BATCH, M)
    assert (cache.mem_pos == -1).all() and torch.isinf(cache.mem_score).all()
    assert cache.cand_k.shape == (BATCH, C, 2, DH) and cache.cand_score.shape == (BATCH, C)
    assert cache.ssm.ssm_state.dtype == torch.float32
    no_memory = make_mixer(seed=16, fading_span=0, capacity=0).new_cache(BATCH)
    assert no_memory.fading is None and no_memory.mem_k is None


# ------------------------------------------------------------------ special cases §8.4


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("ssm_residual", [False, True])
@pytest.mark.parametrize("window", [1, 4, 7])
def test_no_fading_no_memory_is_sliding_window_attention(n_kv_heads: int, qk_norm: bool,
                                                         ssm_residual: bool, window: int) -> None:
    torch.manual_seed(20)
    attn = Attention(D_MODEL, H, n_kv_heads, window=window, qk_norm=qk_norm)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    mixer = make_mixer(seed=21, n_kv_heads=n_kv_heads, window=window, fading_span=0,
                       chunk_size=3, capacity=0, qk_norm=qk_norm, ssm_residual=ssm_residual)
    result = mixer.load_state_dict(attn.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(key.startswith("ssm.") for key in result.missing_keys)
    assert set(mixer.state_dict()) - set(result.missing_keys) == set(attn.state_dict())
    x = make_input(37, seed=22)
    with torch.no_grad():
        expected = attn(x) + (mixer.ssm(x) if ssm_residual else 0.0)
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-5)
        # Decoding too.
        cache = mixer.new_cache(BATCH)
        mixer(x[:, :5], cache)
        tail = torch.stack([mixer.step(x[:, t], cache, t) for t in range(5, 37)], 1)
        torch.testing.assert_close(tail, expected[:, 5:], atol=1e-5, rtol=1e-5)


def test_extra_parameters_by_config() -> None:
    def extra(**kw):
        return {n.split(".")[0] for n in make_mixer(**kw).state_dict()} - {
            "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "ssm"}

    assert extra(capacity=0) == set()
    assert extra(capacity=4, selection="topk") == {"predictor"}
    assert extra(capacity=4, selection="random") == set()
    assert extra(capacity=4, selection="recent") == set()
    assert extra(capacity=0, tie=False) == {"kf_proj", "vf_proj"}
    assert extra(capacity=4, qkv_conv=4) == {"predictor", "qkv_conv"}
    conv = make_mixer(qkv_conv=3).qkv_conv  # depthwise over the channels of q, k, v
    assert tuple(conv.weight.shape) == (D_MODEL + 2 * 2 * DH, 1, 3) and conv.bias is not None
    low_rank = make_mixer(capacity=4, rank=3).predictor
    assert [tuple(p.shape) for p in low_rank.parameters()] == [(3, D_MODEL), (D_MODEL, 3)]


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError):
        make_mixer(rope="relative")
    with pytest.raises(ValueError):
        make_mixer(k=3, capacity=4)  # capacity must be a multiple of k
    with pytest.raises(ValueError, match="qkv_conv"):
        make_mixer(qkv_conv=-1)
    with pytest.raises(ValueError, match="qkv_conv"):
        make_mixer(qkv_conv=True)


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_predictor_is_trained_only_by_aux(policy: str, rank: int) -> None:
    mixer = make_mixer(seed=30, policy=policy, rank=rank)
    x = make_input(30, seed=31).requires_grad_(True)
    g = torch.randn(BATCH, 30, D_MODEL, generator=torch.Generator().manual_seed(32))
    names = [n for n, _ in mixer.named_parameters()]
    params = [p for _, p in mixer.named_parameters()]
    is_pred = [n.startswith("predictor") for n in names]
    assert any(is_pred)

    y, aux = mixer.forward_with_aux(x)
    main = torch.autograd.grad((y * g).sum(), [x, *params], allow_unused=True)
    y, aux = mixer.forward_with_aux(x)
    total = torch.autograd.grad((y * g).sum() + aux, [x, *params], allow_unused=True)
    y, aux = mixer.forward_with_aux(x)
    aux_only = torch.autograd.grad(aux, [x, *params], allow_unused=True)

    def is_zero(grad):
        return grad is None or not grad.any()

    rows = zip(["x", *names], [False, *is_pred], main, total, aux_only, strict=True)
    for name, pred, gm, gt, ga in rows:
        if pred:
            assert is_zero(gm), f"{name} gets gradient from the main loss"
            assert not is_zero(gt) and not is_zero(ga), f"{name} gets no gradient from aux"
            torch.testing.assert_close(gt, ga, atol=1e-6, rtol=1e-6)
        else:
            assert is_zero(ga), f"aux loss reaches {name}"
            torch.testing.assert_close(gt, gm, atol=1e-6, rtol=1e-6, msg=name)


def test_eidetic_keys_carry_gradient_to_k_and_v_proj() -> None:
    """With W = 1 and no fading tokens, a query without memory attends to itself only, so
    ``k_proj`` gets no gradient (zero up to the rounding of the fused attention kernel); with
    memory it does, through the eidetic keys."""
    kw = dict(window=1, fading_span=0, ssm_residual=False, qk_norm=False, rope="none")
    with_mem = make_mixer(seed=33, capacity=M, **kw)
    without = make_mixer(seed=34, capacity=0, **kw)
    result = without.load_state_dict(with_mem.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == {"predictor.0.weight"}
    x = make_input(30, seed=35)
    g = torch.randn(BATCH, 30, D_MODEL, generator=torch.Generator().manual_seed(36))
    (with_mem(x) * g).sum().backward()
    (without(x) * g).sum().backward()
    assert without.k_proj.weight.grad.abs().max() < 1e-5
    assert with_mem.k_proj.weight.grad.abs().max() > 1e-3
    assert not torch.allclose(with_mem.v_proj.weight.grad, without.v_proj.weight.grad, atol=1e-3)


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("i", [21, 27])
def test_gradient_reaches_exactly_the_visible_memory_tokens(rope: str, i: int) -> None:
    """Output ``i`` depends on an input older than the window only through the eidetic
    memory (no fading tokens, no SSM residual; selection is not differentiable)."""
    mixer = make_mixer(seed=37, window=2, fading_span=0, ssm_residual=False, rope=rope)
    x = make_input(30, seed=38).requires_grad_(True)
    g = torch.randn(BATCH, D_MODEL, generator=torch.Generator().manual_seed(39))
    (mixer(x)[:, i] * g).sum().backward()
    sel = hand_select(hand_scores(mixer, x.detach()), C, K, None)
    memory = hand_memory(*sel, M, "score")
    for bi in range(BATCH):
        visible = {t for t in memory[bi][i // C] if t <= i - 2}
        assert visible
        has_grad = {t for t in range(i - 1) if x.grad[bi, t].abs().max() > 0}
        assert has_grad == visible
        assert x.grad[bi, i + 1:].abs().max() == 0


# ------------------------------------------------------------------------ innovation


@pytest.mark.parametrize("rank", [0, 3])
def test_aux_is_mean_innovation(rank: int) -> None:
    mixer = make_mixer(seed=40, rank=rank)
    x = make_input(27, seed=41)
    with torch.no_grad():
        _, aux = mixer.forward_with_aux(x)
        f = mixer.ssm(x)
        f_prev = torch.cat([torch.zeros(BATCH, 1, D_MODEL), f[:, :-1]], 1)
        if rank:
            x_hat = f_prev @ mixer.predictor[0].weight.T @ mixer.predictor[1].weight.T
        else:
            x_hat = f_prev @ mixer.predictor[0].weight.T
        expected = ((x - x_hat) ** 2).sum(-1).div(D_MODEL).mean()
    assert aux.dtype == torch.float32 and aux.dim() == 0
    torch.testing.assert_close(aux, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("selection", ["random", "recent"])
def test_no_aux_without_innovation(selection: str) -> None:
    mixer = make_mixer(seed=42, selection=selection)
    assert mixer.predictor is None
    _, aux = mixer.forward_with_aux(make_input(20, seed=43))
    assert float(aux) == 0.0


@pytest.mark.parametrize("ssm_residual", [False, True])
def test_predictable_tokens_are_not_stored(ssm_residual: bool) -> None:
    """Build ``x`` so that ``x_t = Φ(f_{t-1})`` exactly except at a few novel positions: with a
    tiny threshold only the novel positions enter the memory, and ``aux`` is their mean."""
    mixer = make_mixer(seed=44, policy="score", threshold=1e-6, ssm_residual=ssm_residual)
    length, novel = 24, [0, 6, 13, 14]  # at most k per chunk, at most M in all
    gen = torch.Generator().manual_seed(45)
    ssm_cache = mixer.ssm.new_cache(1)
    f_prev = torch.zeros(1, D_MODEL)
    tokens = []
    with torch.no_grad():
        for t in range(length):
            x_t = mixer.predictor(f_prev)
            if t in novel:
                x_t = x_t + torch.randn(1, D_MODEL, generator=gen)
            tokens.append(x_t)
            f_prev = mixer.ssm.step(x_t, ssm_cache)
        x = torch.stack(tokens, 1)
        scores = hand_scores(mixer, x)[0]
        assert scores[novel].min() > 0.1
        others = [t for t in range(length) if t not in novel]
        assert scores[others].max() < 1e-8
        cache = mixer.new_cache(1)
        _, aux = mixer.forward_with_aux(x, cache)
    assert _memory_sets(cache.mem_pos) == [set(novel)]
    torch.testing.assert_close(aux, scores[novel].sum() / length, atol=1e-6, rtol=1e-6)
    # Decoding keeps exactly the same memory, chunk by chunk.
    cache = mixer.new_cache(1)
    with torch.no_grad():
        for t in range(length):
            mixer.step(x[:, t], cache, t)
            done = (t + 1) // C * C
            assert _memory_sets(cache.mem_pos) == [{p for p in novel if p < done}]


# ---------------------------------------------------------------------- eidetic rope


@pytest.mark.parametrize("rope", ROPES)
def test_eidetic_score_rotation(rope: str) -> None:
    """``<q_mem_i, k_e>``: unrotated for "none", true positions for "absolute", and for
    "window_edge" the key rotated as if at ``i - W - F`` whatever its true position."""
    mixer = make_mixer(seed=46, n_kv_heads=H, rope=rope, window=5, fading_span=3)
    gen = torch.Generator().manual_seed(47)
    n = 40
    q = torch.randn(1, n, H, DH, generator=gen)
    k = torch.randn(1, n, H, DH, generator=gen)
    i = torch.arange(n) + 10
    t = torch.randint(0, 200, (n,), generator=gen)  # the key's true position
    q_rot, k_rot = _rot(q, i), _rot(k, t)
    got = (mixer.eidetic_query(q, q_rot) * mixer.eidetic_key(k, k_rot)).sum(-1)
    if rope == "none":
        expected = (q * k).sum(-1)
    elif rope == "absolute":
        expected = (q_rot * k_rot).sum(-1)
    else:
        expected = (q_rot * _rot(k, i - 5 - 3)).sum(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if rope != "none":  # the rotation matters at these positions
        assert not torch.allclose(got, (q * k).sum(-1), atol=1e-2)


# ------------------------------------------------------------------------ causality


@pytest.mark.parametrize(
    ("policy", "selection", "rope"),
    [("score", "topk", "absolute"), ("fifo", "random", "window_edge"),
     ("score", "recent", "none"), ("fifo", "topk", "none")],
)
@pytest.mark.parametrize("i", [5, 17, 30])
def test_causality(policy: str, selection: str, rope: str, i: int) -> None:
    mixer = make_mixer(seed=50, policy=policy, selection=selection, rope=rope)
    length = 40
    x = make_input(length, seed=51)
    x2 = x.clone()
    x2[:, i + 1:] = 3.0 * torch.randn(BATCH, length - i - 1, D_MODEL,
                                      generator=torch.Generator().manual_seed(52))
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, : i + 1], y[:, : i + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y2[:, i + 1:], y[:, i + 1:], atol=1e-3)


# ------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("qkv_conv", [0, 4])
def test_bf16_autocast_forward_backward(qkv_conv: int) -> None:
    mixer = make_mixer(seed=60, policy="score", rope="window_edge", qkv_conv=qkv_conv).train()
    x = make_input(40, seed=61).requires_grad_(True)
    cache = mixer.new_cache(BATCH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = mixer.forward_with_aux(x, cache)
    assert torch.isfinite(y).all() and torch.isfinite(aux)
    assert aux.dtype == torch.float32
    assert cache.ssm.ssm_state.dtype == torch.float32
    (y.float().pow(2).mean() + aux).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        ref = mixer(x)
    torch.testing.assert_close(y.float(), ref, atol=0.15, rtol=0.15)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = mixer.step(x[:, 0].detach(), cache, 40)
    assert torch.isfinite(out).all() and cache.ssm.ssm_state.dtype == torch.float32


@pytest.mark.parametrize(("selection", "qkv_conv"), [("topk", 0), ("recent", 0), ("topk", 4)])
def test_bf16_weights(selection: str, qkv_conv: int) -> None:
    """A model cast to bfloat16 (inference) runs forward, prefill and decoding."""
    mixer = make_mixer(seed=62, selection=selection, qkv_conv=qkv_conv)
    x = make_input(30, seed=63)
    with torch.no_grad():
        ref = mixer(x)
    mixer = mixer.to(torch.bfloat16)
    cache = mixer.new_cache(BATCH)
    assert cache.ssm.ssm_state.dtype == torch.float32
    with torch.no_grad():
        head = mixer(x[:, :20].bfloat16(), cache)
        tail = torch.stack([mixer.step(x[:, t].bfloat16(), cache, t) for t in range(20, 30)], 1)
    out = torch.cat([head, tail], 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert cache.ssm.ssm_state.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.2, rtol=0.2)


@pytest.mark.parametrize("rank", [0, 3])
def test_predictor_starts_at_zero(rank: int) -> None:
    """x̂ = 0 at initialisation: the first innovation scores are ||x_t||² / D."""
    torch.manual_seed(0)
    mixer = BMojoMixer(D_MODEL, H, H, window=4, fading_span=3, chunk_size=4, eidetic_per_chunk=2,
                       eidetic_capacity=4, innovation_rank=rank, d_state=8, ssm_headdim=16)
    assert all(torch.count_nonzero(p) == 0 for p in mixer.predictor.parameters())
    x = make_input()
    _, aux = mixer.forward_with_aux(x)
    torch.testing.assert_close(aux, x.pow(2).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, field", [
    (dict(eidetic_capacity=8, eidetic_per_chunk=0), "eidetic_per_chunk"),
    (dict(eidetic_capacity=6, eidetic_per_chunk=4), "eidetic_capacity"),
    (dict(eidetic_capacity=8, eidetic_per_chunk=2, eidetic_policy="lru"), "eidetic_policy"),
    (dict(selection="best"), "selection"),
    (dict(eidetic_rope="relative"), "eidetic_rope"),
    (dict(window=0), "window"),
    (dict(fading_span=-1), "fading_span"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_invalid_arguments_name_the_field(overrides, field) -> None:
    kwargs = {**dict(window=4, fading_span=3, chunk_size=4, d_state=8, ssm_headdim=16), **overrides}
    with pytest.raises(ValueError, match=field):
        BMojoMixer(D_MODEL, H, H, **kwargs)
