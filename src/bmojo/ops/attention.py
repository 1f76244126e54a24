"""The union attention of DESIGN.md §3.3: one softmax over three key sets.

For a query at absolute position ``i`` the visible keys are

- the **raw window** ``k_j, v_j`` for ``j ∈ [i-W+1, i]`` (``window=None``: ``j ∈ [0, i]``);
- the **fading tokens** ``kf_j, vf_j`` for ``j ∈ [i-W-F+1, i-W]``;
- the **eidetic memory** of the query's chunk: slots whose position ``t`` satisfies
  ``0 <= t <= i - W`` (an empty slot has position ``-1``). Memory keys are scored with
  ``q_mem`` (the query as the eidetic rope mode wants it, DESIGN.md §3) instead of ``q``.

Eidetic memory is given per query chunk: ``mem_k, mem_v [b, nq, M, hkv, dh]`` and
``mem_pos [b, nq, M]`` hold the memory visible to chunk ``c`` (queries
``c*chunk_size .. (c+1)*chunk_size - 1``), where ``nq = ceil(l / chunk_size)``.

Three functions compute it:

- :func:`union_attention_reference`: dense ``L x L`` scores with explicit masks;
- :func:`union_attention_chunked`: the fast path; queries in blocks of ``chunk_size``
  against only the keys a block can see, never an ``L x L`` matrix
  (:func:`union_attention_blocks`); full causal attention (``window=None``), and plain
  sliding-window attention over short sequences, go to PyTorch's fused SDPA;
- :func:`union_attention_step`: one query against a decoding cache;
- :func:`attention_continued`: the raw-window (or full causal) attention of a block of new
  queries that continue a sequence whose past keys a cache holds (a continued prefill).

:func:`union_attention_for` picks a layer's parallel form by name: these PyTorch ops
(``"torch"``), or the Triton kernels of :mod:`bmojo.ops.attention_triton` (``"triton"``, CUDA).

Shapes: ``q [b, l, h, dh]``, ``k, v, kf, vf [b, l, hkv, dh]`` with ``h % hkv == 0``
(grouped-query attention: query head ``i`` reads key head ``i // (h // hkv)``).
Softmax is computed in float32; the output has the dtype of ``v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _check_inputs(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, chunk_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [b, l, h, dh] and k, v [b, l, hkv, dh]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of key/value heads {k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None (full attention), got {window}")
    if fading_span < 0:
        raise ValueError(f"fading_span must be >= 0, got {fading_span}")
    if fading_span > 0 and (kf is None or vf is None or kf.shape != k.shape or vf.shape != v.shape):
        raise ValueError("fading_span > 0 needs kf and vf shaped like k and v")
    if (fading_span > 0 or mem_k is not None) and window is None:
        raise ValueError("fading tokens and eidetic memory need a finite window")
    if mem_k is not None:
        nq = math.ceil(q.shape[1] / chunk_size)
        b, _, hkv, dh = k.shape
        if mem_k.dim() != 5 or mem_k.shape[:2] != (b, nq) or mem_k.shape[3:] != (hkv, dh):
            raise ValueError(f"mem_k must be [b, ceil(l/chunk_size), M, hkv, dh] = [{b}, {nq}, M, {hkv}, "
                             f"{dh}], got {tuple(mem_k.shape)}")
        if mem_v is None or mem_v.shape != mem_k.shape or mem_pos is None or mem_pos.shape != mem_k.shape[:3]:
            raise ValueError("mem_v must match mem_k and mem_pos must be [b, nq, M]")


def union_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    fading_span: int = 0,
    kf: Tensor | None = None,
    vf: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_pos: Tensor | None = None,
    q_mem: Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Dense reference: every key set scored against every query, then masked. [b, l, h, dh]."""
    _check_inputs(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, chunk_size)
    b, l, h, dh = q.shape
    group = h // k.shape[2]
    scale = dh**-0.5 if scale is None else scale
    i = torch.arange(l, device=q.device)[:, None]  # query positions [l, 1]
    j = torch.arange(l, device=q.device)[None, :]  # key positions [1, l]

    def expand(t: Tensor) -> Tensor:  # [b, s, hkv, dh] -> [b, h, s, dh]
        return t.float().repeat_interleave(group, dim=2).transpose(1, 2)

    qh = q.float().transpose(1, 2)  # [b, h, l, dh]
    raw_visible = j <= i if window is None else (j <= i) & (j >= i - window + 1)
    scores = [(qh @ expand(k).transpose(-1, -2)).masked_fill(~raw_visible, float("-inf"))]
    values = [expand(v)]
    if fading_span > 0:
        fading_visible = (j <= i - window) & (j >= i - window - fading_span + 1)
        scores.append((qh @ expand(kf).transpose(-1, -2)).masked_fill(~fading_visible, float("-inf")))
        values.append(expand(vf))
    if mem_k is not None:
        nq, m = mem_k.shape[1], mem_k.shape[2]
        qm = (q if q_mem is None else q_mem).float().transpose(1, 2)
        flat_pos = mem_pos.reshape(b, 1, nq * m)  # [b, 1, nq*M]
        slot_chunk = torch.arange(nq, device=q.device).repeat_interleave(m)  # [nq*M]
        mem_visible = (slot_chunk[None, None, :] == (i // chunk_size)[None]) & (flat_pos >= 0) & (
            flat_pos <= i[None] - window
        )  # [b, l, nq*M]
        mk = expand(mem_k.reshape(b, nq * m, *mem_k.shape[3:]))
        s = (qm @ mk.transpose(-1, -2)).masked_fill(~mem_visible[:, None], float("-inf"))
        scores.append(s)
        values.append(expand(mem_v.reshape(b, nq * m, *mem_v.shape[3:])))
    probs = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)
    out = probs @ torch.cat(values, dim=-2)  # [b, h, l, dh]
    return out.transpose(1, 2).to(v.dtype)


def _shifted_blocks(t: Tensor, nq: int, C: int, lo: int, hi: int) -> tuple[Tensor, tuple[int, ...], Tensor]:
    """For every block start ``s = n*C``, the keys at positions ``s+lo .. s+hi`` (and a few
    more), taken as whole blocks ``n + d`` for ``d = lo//C .. hi//C`` (zeros outside the sequence).

    ``t [b, l, hkv, dh]`` -> ``(blocks, starts, offsets [K])``: ``t`` padded and cut into blocks
    ``[b, hkv, nb, C, dh]`` (head-major), the first block of each ``d`` (query block ``n`` reads
    block ``start + n``: :func:`_gather_blocks`), and the keys' positions relative to the block start.
    """
    first, last = lo // C, hi // C
    front, back = max(-first, 0), max(last, 0)
    b, l, hkv, dh = t.shape
    padded = F.pad(t.transpose(1, 2), (0, 0, front * C, (nq + back) * C - l))  # [b, hkv, l', dh]
    blocks = padded.reshape(b, hkv, front + nq + back, C, dh)
    starts = tuple(front + d for d in range(first, last + 1))
    return blocks, starts, torch.arange(first * C, (last + 1) * C, device=t.device)


def _gather_blocks(block_sets: list[tuple[Tensor, tuple[int, ...]]], nq: int) -> Tensor:
    """The keys (or values) of every query block, contiguous: ``[(blocks [b, hkv, nb, C, dh],
    starts)]`` (:func:`_shifted_blocks`) -> ``[b, hkv, nq, K, dh]``, the blocks ``start + n`` side by side."""
    return torch.cat([blocks[:, :, start: start + nq] for blocks, starts in block_sets for start in starts], dim=3)


def _block_sets(k: Tensor, v: Tensor, raw_starts: tuple[int, ...], kf: Tensor | None, vf: Tensor | None,
                fading_starts: tuple[int, ...]) -> tuple[list, list]:
    """The block sets of the keys and of the values for :func:`_gather_blocks`: the raw blocks,
    then the fading ones when there are fading tokens."""
    fading = kf is not None
    return ([(k, raw_starts)] + ([(kf, fading_starts)] if fading else []),
            [(v, raw_starts)] + ([(vf, fading_starts)] if fading else []))


def _gather_blocks_backward(d_gathered: Tensor, block_sets: list[tuple[Tensor, tuple[int, ...]]]) -> list[Tensor]:
    """The gradient of :func:`_gather_blocks` for each set's blocks, from ``d_gathered [b, hkv, nq, K, dh]``."""
    nq, grads, column = d_gathered.shape[2], [], 0
    for blocks, starts in block_sets:
        C = blocks.shape[3]
        grad = d_gathered.new_zeros(blocks.shape)
        for start in starts:
            grad[:, :, start: start + nq] += d_gathered[:, :, :, column: column + C]
            column += C
        grads.append(grad)
    return grads


class _BlockAttention(torch.autograd.Function):
    """Softmax attention of query blocks over their own key blocks, backward written out.

    ``q [b, hkv, nq, R, dh]`` (already scaled) against the ``K`` keys and values of each query
    block, gathered from the raw ``k, v`` and the fading ``kf, vf`` blocks (``[b, hkv, nb, C, dh]``,
    the blocks ``start + n`` of each start in ``raw_starts``, ``fading_starts``: :func:`_gather_blocks`),
    with the additive mask ``bias`` (0 or -inf, broadcastable to ``[b, hkv, nq, R/C, C, K]``) and,
    optionally, ``q_mem`` against the memory keys ``mem_k, mem_v [b, hkv, nq, M, dh]`` with
    ``mem_bias``: one softmax over the ``K + M`` scores (float32). Returns ``[b, hkv, nq, R, dh]``.

    Autograd through the same ops writes and reads the ``[R, K + M]`` scores about ten times
    (concatenation, scaling, masking, softmax, each with its backward); here the masking writes
    both key sets' scores into one buffer, softmax normalises it, and the backward is the
    standard ``dS = P ∘ (dP - rowsum(dO ∘ O))``, per key set, with ``P`` kept as the products
    used it, in the values' dtype (bf16 under autocast: half the bytes of the largest saved
    tensor). The gathered keys and values (each position ``K / C`` times) are not kept: the
    backward gathers them again from the blocks, a copy. Every batched matmul writes a
    contiguous result: ``torch.bmm(out=...)`` into a strided view of the union runs one matrix
    at a time, at about 0.6× the speed (docs/performance.md). Under ``torch.compile`` the two
    score writes are slice assignments, which dynamo traces (``out=`` into a slice broke the graph
    at every layer). Tested equal, outputs and gradients, to :func:`union_attention_reference`,
    eagerly and compiled (tests/ops/test_attention.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, raw_starts, kf, vf, fading_starts, bias, q_mem, mem_k, mem_v, mem_bias):
        b, hkv, nq, R, dh = q.shape
        C = bias.shape[-2]
        key_sets, value_sets = _block_sets(k, v, raw_starts, kf, vf, fading_starts)
        keys, values = _gather_blocks(key_sets, nq), _gather_blocks(value_sets, nq)  # [b, hkv, nq, K, dh]
        K, M = keys.shape[3], 0 if mem_k is None else mem_k.shape[3]
        n = b * hkv * nq

        def key_scores(query, keys):  # one key set's scores, [b, hkv, nq, R/C, C, keys]
            return torch.bmm(query.reshape(n, R, dh), keys.reshape(n, keys.shape[3], dh).mT).view(
                b, hkv, nq, R // C, C, keys.shape[3])

        scores = q.new_empty(b, hkv, nq, R // C, C, K + M, dtype=torch.float32)
        if torch.compiler.is_compiling():  # dynamo does not trace out= into a strided slice: assign
            scores[..., :K] = key_scores(q, keys) + bias
            if M:
                scores[..., K:] = key_scores(q_mem, mem_k) + mem_bias
        else:  # eagerly the sum is written in place, without a temporary of the scores
            torch.add(key_scores(q, keys), bias, out=scores[..., :K])
            if M:
                torch.add(key_scores(q_mem, mem_k), mem_bias, out=scores[..., K:])
        # The probabilities in the values' dtype: what the products use, and what the backward
        # keeps (half the bytes of float32 under autocast; they are the largest saved tensors).
        # Cast per key set: under bf16 each comes out contiguous, where a batched matmul on the
        # CPU would first copy an operand sliced out of a wider row (in float32 they stay views
        # of the union, which it reads in place).
        probs = torch.softmax(scores.view(n, R, K + M), dim=-1)  # [n, R, K+M] float32
        p_keys, p_mem = probs[..., :K].to(v.dtype), probs[..., K:].to(v.dtype)  # [n, R, K], [n, R, M]
        out = torch.bmm(p_keys, values.reshape(n, K, dh))
        if M:
            out.baddbmm_(p_mem, mem_v.reshape(n, M, dh))
        ctx.starts = raw_starts, fading_starts
        ctx.save_for_backward(q, k, v, kf, vf, q_mem, mem_k, mem_v, p_keys, p_mem, out)
        return out.view(b, hkv, nq, R, dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, kf, vf, q_mem, mem_k, mem_v, p_keys, p_mem, out = ctx.saved_tensors
        raw_starts, fading_starts = ctx.starts
        b, hkv, nq, R, dh = q.shape
        key_sets, value_sets = _block_sets(k, v, raw_starts, kf, vf, fading_starts)
        keys, values = _gather_blocks(key_sets, nq), _gather_blocks(value_sets, nq)  # [b, hkv, nq, K, dh]
        n, M = p_keys.shape[0], p_mem.shape[2]
        d_out = d_out.reshape(n, R, dh).contiguous()
        row = (d_out.float() * out.float()).sum(-1, keepdim=True)  # = rowsum(dP ∘ P), [n, R, 1]

        def grads(query, keys, values, p):  # one key set's d query, d keys, d values; p [n, R, keys]
            shape = keys.shape
            keys, values = keys.reshape(n, shape[3], dh), values.reshape(n, shape[3], dh)
            query = query.reshape(n, R, dh)
            d_probs = torch.bmm(d_out, values.mT)  # [n, R, keys]
            d_scores = d_probs.float().sub_(row).mul_(p).to(q.dtype)
            return (torch.bmm(d_scores, keys), torch.bmm(d_scores.mT, query).view(shape),
                    torch.bmm(p.mT, d_out).view(shape))

        dq, d_keys, d_values = grads(q, keys, values, p_keys)
        dk, *dkf = _gather_blocks_backward(d_keys, key_sets)
        dv, *dvf = _gather_blocks_backward(d_values, value_sets)
        dq_mem = dmem_k = dmem_v = None
        if M:
            dq_mem, dmem_k, dmem_v = grads(q_mem, mem_k, mem_v, p_mem)
            dq_mem = dq_mem.view(q.shape)
        return (dq.view(q.shape), dk, dv, None, *(dkf or [None]), *(dvf or [None]), None, None,
                dq_mem, dmem_k, dmem_v, None)


DENSE_WINDOW_MAX_LEN = 256


def dense_window_is_faster(length: int, window: int) -> bool:
    """Whether plain sliding-window attention over ``length`` positions runs faster as one
    fused SDPA call with a band mask (``O(L²)`` work, one kernel) than in query blocks
    (``O(L·(C+W))`` work, many small matmuls): up to ``max(256, 4·W)`` positions, from
    ``bmojo bench ops`` (docs/performance.md)."""
    return length <= max(DENSE_WINDOW_MAX_LEN, 4 * window)


ATTENTION_KERNELS = ("torch", "triton")


def union_attention_for(kernel: str) -> Callable[..., Tensor]:
    """The union attention's parallel form for a layer's ``attention_kernel``, with the arguments
    and result of :func:`union_attention_reference`: :func:`union_attention_chunked` (``"torch"``)
    or :func:`bmojo.ops.attention_triton.union_attention_triton` (``"triton"``, which needs triton
    installed, else a ``ValueError`` here, and CUDA tensors, else a ``ValueError`` at its first call)."""
    if kernel == "torch":
        return union_attention_chunked
    if kernel == "triton":
        try:
            from bmojo.ops.attention_triton import union_attention_triton
        except ImportError as err:
            raise ValueError(f"attention_kernel='triton': {err}") from None
        return union_attention_triton
    raise ValueError(f"attention_kernel={kernel!r} is invalid: must be one of {ATTENTION_KERNELS}")


def union_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    fading_span: int = 0,
    kf: Tensor | None = None,
    vf: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_pos: Tensor | None = None,
    q_mem: Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Fast path, same arguments and result as :func:`union_attention_reference`.

    In query blocks (:func:`union_attention_blocks`), except where PyTorch's fused SDPA does
    the same work faster: full causal attention (also when the window covers the whole
    sequence), and plain sliding-window attention (no fading token, no memory) over a
    sequence short enough for :func:`dense_window_is_faster`, as one band-masked call.
    """
    _check_inputs(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, chunk_size)
    b, l, h, dh = q.shape
    if window is not None and window >= l:
        # The window covers the whole sequence: no fading token (j <= i - W < 0) and no
        # eidetic slot (t <= i - W < 0) is visible, so this is exactly full causal attention.
        window = None
    plain_window = window is not None and fading_span == 0 and mem_k is None
    if window is not None and not (plain_window and dense_window_is_faster(l, window)):
        return union_attention_blocks(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, q_mem,
                                      chunk_size, scale)
    group = h // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    if window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        i, j = torch.arange(l, device=q.device)[:, None], torch.arange(l, device=q.device)[None, :]
        band = (j <= i) & (j > i - window)  # [l, l]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=band, scale=scale)
    return out.transpose(1, 2)


def union_attention_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    fading_span: int = 0,
    kf: Tensor | None = None,
    vf: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_pos: Tensor | None = None,
    q_mem: Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
) -> Tensor:
    """The blocked computation of :func:`union_attention_chunked` (finite ``window``), same
    arguments and result as :func:`union_attention_reference`.

    Query block ``n`` (positions ``s = n*C .. s+C-1``) is scored against the whole key blocks
    covering the raw keys ``[s-W+1, s+C-1]`` (``C·(1+⌈(W-1)/C⌉)`` keys), the fading keys
    ``[s-W-F+1, s+C-1-W]`` (about ``C+F`` keys) and the ``M`` memory slots of its chunk:
    ``O(L·(2C+W+F+M))`` work instead of ``O(L²)``.
    """
    _check_inputs(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, chunk_size)
    if window is None:
        raise ValueError("union_attention_blocks needs a finite window")
    b, l, h, dh = q.shape
    hkv = k.shape[2]
    group = h // hkv
    scale = dh**-0.5 if scale is None else scale
    C, W, Fs = min(chunk_size, l), window, fading_span  # a sequence shorter than a chunk is one block
    nq = math.ceil(l / C)
    device = q.device
    a = torch.arange(C, device=device)  # query offset inside the block
    block_start = torch.arange(nq, device=device) * C  # [nq]

    def head_major_blocks(query: Tensor) -> Tensor:  # [b, l, h, dh] -> [b, hkv, nq, group*C, dh], scaled
        padded = F.pad(query * scale, (0, 0, 0, 0, 0, nq * C - l)).view(b, nq, C, hkv, group, dh)
        return padded.permute(0, 3, 1, 4, 2, 5).reshape(b, hkv, nq, group * C, dh)

    def visible(offsets: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """[nq, C, K]: key at ``s + offset`` is visible to query ``s + a`` iff
        ``lo[a] <= offset <= hi[a]`` and the key position is >= 0."""
        in_range = (offsets[None, :] >= lo[:, None]) & (offsets[None, :] <= hi[:, None])  # [C, K]
        return in_range[None] & (block_start[:, None, None] + offsets[None, None, :] >= 0)

    def hidden_bias(seen: Tensor) -> Tensor:  # bool -> float32: 0 where seen, -inf elsewhere
        return torch.zeros(seen.shape, device=device).masked_fill_(~seen, float("-inf"))

    # Raw window: keys j in [i-W+1, i], i.e. offsets in [a-W+1, a].
    raw_k, raw_starts, offsets = _shifted_blocks(k, nq, C, -(W - 1), C - 1)  # blocks [b, hkv, nb, C, dh]
    raw_v, _, _ = _shifted_blocks(v, nq, C, -(W - 1), C - 1)
    masks = [visible(offsets, a - W + 1, a)]  # [nq, C, K]
    fading = (None, None, ())
    if Fs > 0:
        # Fading tokens: j in [i-W-F+1, i-W], i.e. offsets in [a-W-F+1, a-W].
        fading_k, fading_starts, offsets = _shifted_blocks(kf, nq, C, -(W + Fs - 1), C - 1 - W)
        fading = (fading_k, _shifted_blocks(vf, nq, C, -(W + Fs - 1), C - 1 - W)[0], fading_starts)
        masks.append(visible(offsets, a - W - Fs + 1, a - W))
    q_blocks = head_major_blocks(q)  # [b, hkv, nq, group*C, dh]
    bias = hidden_bias(torch.cat(masks, dim=-1))[None, None, :, None]  # [1, 1, nq, 1, C, K]
    memory = (None, None, None, None)
    if mem_k is not None:
        query_pos = block_start[:, None] + a[None, :]  # [nq, C]
        mem_visible = (mem_pos[:, :, None, :] >= 0) & (
            mem_pos[:, :, None, :] <= query_pos[None, :, :, None] - W
        )  # [b, nq, C, M]
        qm_blocks = q_blocks if q_mem is None else head_major_blocks(q_mem)
        mem_k_hm, mem_v_hm = (t.permute(0, 3, 1, 2, 4).contiguous() for t in (mem_k, mem_v))  # [b, hkv, nq, M, dh]
        memory = (qm_blocks, mem_k_hm, mem_v_hm, hidden_bias(mem_visible)[:, None, :, None])  # bias [b, 1, nq, 1, C, M]
    out = _BlockAttention.apply(q_blocks, raw_k, raw_v, raw_starts, *fading, bias, *memory)
    out = out.view(b, hkv, nq, group, C, dh).permute(0, 2, 4, 1, 3, 5)  # [b, nq, C, hkv, group, dh]
    return out.reshape(b, nq * C, h, dh)[:, :l]


def attention_continued(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    window: int | None,
    chunk_size: int = 64,
    scale: float | None = None,
    windowed: Callable[..., Tensor] = union_attention_chunked,
) -> Tensor:
    """Attention of ``l`` new queries that continue a sequence: ``q [b, l, h, dh]`` and
    ``k, v [b, l, hkv, dh]`` at positions ``p .. p+l-1``, ``past_k, past_v [b, n, hkv, dh]``
    the keys of positions ``p-n .. p-1`` (every past position for full attention, at least
    the last ``min(p, W-1)`` for a window). Same result as :func:`union_attention_chunked`
    over the whole sequence, rows ``p ..``; ``[b, l, h, dh]``.

    Full attention: one SDPA call of the new queries against past and new keys, with the
    causal mask shifted by ``n``. Window: ``windowed`` (the union attention's parallel form of
    the layer's kernel, :func:`union_attention_for`) over the past and new positions, with zero
    queries in the past (their rows are dropped).
    """
    n, l = past_k.shape[1], q.shape[1]
    keys, values = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)  # [b, n+l, hkv, dh]
    if window is not None:
        queries = torch.cat([q.new_zeros(q.shape[0], n, *q.shape[2:]), q], 1)  # [b, n+l, h, dh]
        return windowed(queries, keys, values, window, chunk_size=chunk_size, scale=scale)[:, n:]
    _check_inputs(q, k, v, window, 0, None, None, None, None, None, chunk_size)
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # [b, h, l, dh]
    kh, vh = (t.transpose(1, 2).repeat_interleave(group, dim=1) for t in (keys, values))  # [b, h, n+l, dh]
    causal = torch.arange(n + l, device=q.device)[None, :] <= torch.arange(l, device=q.device)[:, None] + n
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal, scale=scale)  # [b, h, l, dh]
    return out.transpose(1, 2)


def union_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    visible: Tensor,
    q_mem: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_visible: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """One decoding query against cached keys. ``q [b, h, dh]``; ``k, v [b, s, hkv, dh]``
    (raw and fading keys of the cache); ``visible [b, s]`` or ``[s]``; the eidetic slots
    ``mem_k, mem_v [b, M, hkv, dh]`` with ``mem_visible [b, M]`` are scored with ``q_mem``.
    Returns ``[b, h, dh]``."""
    b, h, dh = q.shape
    hkv = k.shape[2]
    scale = dh**-0.5 if scale is None else scale
    qg = q.view(b, hkv, h // hkv, dh)
    scores = [torch.einsum("bkgd,bskd->bkgs", qg, k)]
    masks = [visible.expand(b, k.shape[1])]
    values = [v]
    if mem_k is not None:
        qm = (q if q_mem is None else q_mem).view(b, hkv, h // hkv, dh)
        scores.append(torch.einsum("bkgd,bskd->bkgs", qm, mem_k))
        masks.append(mem_visible)
        values.append(mem_v)
    logits = torch.cat(scores, dim=-1).float() * scale
    logits = logits.masked_fill(~torch.cat(masks, dim=-1)[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bkgs,bskd->bkgd", probs, torch.cat(values, dim=1))
    return out.reshape(b, h, dh)
