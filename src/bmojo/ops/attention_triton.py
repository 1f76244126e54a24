"""The union attention of DESIGN.md §3.3 as Triton kernels: flash-attention style, one pass
over the keys a query block can see, the scores never stored (forward and backward).

Same arguments and result as :func:`bmojo.ops.attention.union_attention_reference`; query ``i``
sees the raw keys ``[i-W+1, i]``, the fading keys ``[i-W-F+1, i-W]`` and the slots of chunk
``i // chunk_size`` whose position ``t`` satisfies ``0 <= t <= i - W`` (memory keys scored
with ``q_mem``). Four kernels:

- ``_forward``: grid ``(b·h, query blocks)``; an online softmax over the three key sets, in
  base 2; stores the output and each row's log-sum-exp for the backward pass.
- ``_backward_query``: the same grid; ``dq`` (raw and fading keys) and ``dq_mem`` (slots).
- ``_backward_keys``: grid ``(b·hkv, key blocks)``; ``dk, dv`` of one sequence key set (raw,
  or fading), summed over the queries that see a key and the query heads of its group.
- ``_backward_memory``: grid ``(b·hkv, slot blocks, chunks)``; ``d mem_k, d mem_v``.

Every output row is written by one program: no atomics, the same result run to run.

Needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before this module is imported (Triton's
interpreter runs the kernels on the CPU with NumPy: how the tests check them without a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bmojo.ops.attention import _check_inputs
from bmojo.ops.triton_support import contiguous, dense_like, require_triton

triton = require_triton("bmojo.ops.attention_triton")
import triton.language as tl  # noqa: E402 (after the check that triton is there)

LOG2E = 1.4426950408889634
INTERPRETED = triton.knobs.runtime.interpret
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _sequence_visible(i, j, near, far, length):
    """Query positions ``i`` see sequence keys ``j`` (broadcast shapes) in ``[i-far, i-near]``."""
    return (j <= i - near) & (j >= i - far) & (j >= 0) & (j < length) & (i < length)


@triton.jit
def _memory_visible(i, pos, slot_ok, chunk, window, chunk_size, length):
    """Query positions ``i`` see the slots of ``chunk`` holding positions ``pos``."""
    return (i // chunk_size == chunk) & (i < length) & (pos >= 0) & (pos <= i - window) & slot_ok


@triton.jit
def _softmax_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION: tl.constexpr):
    """One key tile of the online softmax: ``q [BM, D]``, ``k, v [BN, D]``, ``visible [BM, BN]``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN], base-2 logits
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _query_grad_tile(dq, q, do, lse, delta, k, v, visible, qk_scale, PRECISION: tl.constexpr):
    """``dq [BM, D]`` (unscaled) plus one key tile's part: ``Σ_j p_ij (dp_ij - δ_i) k_j``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
    p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _key_grad_tile(dk, dv, k, v, q, do, lse, delta, visible_t, qk_scale, PRECISION: tl.constexpr):
    """``dk, dv [BN, D]`` plus one query tile's part; ``visible_t [BN, BM]`` (keys by queries)."""
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
    p_t = tl.where(visible_t, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _load_rows(ptr, rows, ok, head_dim, BLOCK_D: tl.constexpr):
    """Rows ``rows`` of a ``[*, head_dim]`` tensor, zeros where ``ok`` is false: ``[R, BLOCK_D]``."""
    d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * head_dim + d[None, :], mask=ok[:, None] & (d < head_dim)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(ptr, rows, ok, value, head_dim, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    tl.store(ptr + rows[:, None] * head_dim + d[None, :], value.to(ptr.dtype.element_ty),
             mask=ok[:, None] & (d < head_dim)[None, :])


@triton.jit
def _attend_sequence(acc, m_i, l_i, q, i, first, last, K, V, b, kv_head, length, kv_heads, near, far, qk_scale,
                     head_dim, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The online softmax of queries ``i`` (positions ``first .. last``) over the sequence keys
    ``[i-far, i-near]`` of ``K, V``."""
    for start in range(tl.maximum(first - far, 0), last - near + 1, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # key positions [BN]
        kv_rows = (b.to(tl.int64) * length + j) * kv_heads + kv_head
        k = _load_rows(K, kv_rows, j < length, head_dim, BLOCK_D)
        v = _load_rows(V, kv_rows, j < length, head_dim, BLOCK_D)
        visible = _sequence_visible(i[:, None], j[None, :], near, far, length)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_memory(acc, m_i, l_i, qm, i, first, last, MK, MV, MPOS, b, kv_head, length, kv_heads, n_chunks, slots,
                   window, chunk_size, qk_scale,
                   head_dim, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The online softmax of queries ``i`` over the memory slots of their chunks."""
    for chunk in range(first // chunk_size, last // chunk_size + 1):
        chunk_base = (b.to(tl.int64) * n_chunks + chunk) * slots
        for start in range(0, slots, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)  # slots [BN]
            s_ok = s < slots
            pos = tl.load(MPOS + chunk_base + s, mask=s_ok, other=-1)
            mem_rows = (chunk_base + s) * kv_heads + kv_head
            mk = _load_rows(MK, mem_rows, s_ok, head_dim, BLOCK_D)
            mv = _load_rows(MV, mem_rows, s_ok, head_dim, BLOCK_D)
            visible = _memory_visible(i[:, None], pos[None, :], s_ok[None, :], chunk, window, chunk_size, length)
            acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, qm, mk, mv, visible, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _query_grad_sequence(dq, q, do, lse, delta, i, first, last, K, V, b, kv_head, length, kv_heads, near, far,
                         qk_scale, head_dim, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    """``dq`` (unscaled) of queries ``i`` from the sequence keys ``[i-far, i-near]``."""
    for start in range(tl.maximum(first - far, 0), last - near + 1, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kv_rows = (b.to(tl.int64) * length + j) * kv_heads + kv_head
        k = _load_rows(K, kv_rows, j < length, head_dim, BLOCK_D)
        v = _load_rows(V, kv_rows, j < length, head_dim, BLOCK_D)
        visible = _sequence_visible(i[:, None], j[None, :], near, far, length)
        dq = _query_grad_tile(dq, q, do, lse, delta, k, v, visible, qk_scale, PRECISION)
    return dq


@triton.jit
def _query_grad_memory(dqm, qm, do, lse, delta, i, first, last, MK, MV, MPOS, b, kv_head, length, kv_heads, n_chunks,
                       slots, window, chunk_size, qk_scale, head_dim, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """``dq_mem`` (unscaled) of queries ``i`` from the memory slots of their chunks."""
    for chunk in range(first // chunk_size, last // chunk_size + 1):
        chunk_base = (b.to(tl.int64) * n_chunks + chunk) * slots
        for start in range(0, slots, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            s_ok = s < slots
            pos = tl.load(MPOS + chunk_base + s, mask=s_ok, other=-1)
            mem_rows = (chunk_base + s) * kv_heads + kv_head
            mk = _load_rows(MK, mem_rows, s_ok, head_dim, BLOCK_D)
            mv = _load_rows(MV, mem_rows, s_ok, head_dim, BLOCK_D)
            visible = _memory_visible(i[:, None], pos[None, :], s_ok[None, :], chunk, window, chunk_size, length)
            dqm = _query_grad_tile(dqm, qm, do, lse, delta, mk, mv, visible, qk_scale, PRECISION)
    return dqm


@triton.jit
def _query_block(length, heads, kv_heads, BLOCK_M: tl.constexpr):
    """The query block of a program on grid ``(b·h, query blocks)``: its batch row, head and key
    head, its first and last positions, the positions ``i [BM]`` and which are in the sequence,
    and their rows of ``[b·l·h, dh]``."""
    b = tl.program_id(0) // heads
    h = tl.program_id(0) % heads
    first = tl.program_id(1) * BLOCK_M
    i = first + tl.arange(0, BLOCK_M)
    q_rows = (b.to(tl.int64) * length + i) * heads + h
    return b, h, h // (heads // kv_heads), first, tl.minimum(first + BLOCK_M, length) - 1, i, i < length, q_rows


@triton.jit
def _forward(Q, K, V, KF, VF, QM, MK, MV, MPOS, O, LSE,
             length, heads, kv_heads, n_chunks, slots, window, fading_span, chunk_size, qk_scale,
             head_dim, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_FADING: tl.constexpr, HAS_MEMORY: tl.constexpr, PRECISION: tl.constexpr):
    b, h, kv_head, first, last, i, i_ok, q_rows = _query_block(length, heads, kv_heads, BLOCK_M)
    q = _load_rows(Q, q_rows, i_ok, head_dim, BLOCK_D)  # [BM, BD]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_sequence(acc, m_i, l_i, q, i, first, last, K, V, b, kv_head, length, kv_heads,
                                     0, window - 1, qk_scale, head_dim, BLOCK_D, BLOCK_N, PRECISION)
    if HAS_FADING:
        acc, m_i, l_i = _attend_sequence(acc, m_i, l_i, q, i, first, last, KF, VF, b, kv_head, length, kv_heads,
                                         window, window + fading_span - 1, qk_scale, head_dim, BLOCK_D, BLOCK_N,
                                         PRECISION)
    if HAS_MEMORY:
        qm = _load_rows(QM, q_rows, i_ok, head_dim, BLOCK_D)
        acc, m_i, l_i = _attend_memory(acc, m_i, l_i, qm, i, first, last, MK, MV, MPOS, b, kv_head, length, kv_heads,
                                       n_chunks, slots, window, chunk_size, qk_scale, head_dim, BLOCK_D, BLOCK_N,
                                       PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the sequence see no key
    _store_rows(O, q_rows, i_ok, acc / l_safe[:, None], head_dim, BLOCK_D)
    tl.store(LSE + (b.to(tl.int64) * heads + h) * length + i, m_i + tl.log2(l_safe), mask=i_ok)


@triton.jit
def _backward_query(Q, K, V, KF, VF, QM, MK, MV, MPOS, DO, LSE, DELTA, DQ, DQM,
                    length, heads, kv_heads, n_chunks, slots, window, fading_span, chunk_size, qk_scale, sm_scale,
                    head_dim, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_FADING: tl.constexpr, HAS_MEMORY: tl.constexpr, PRECISION: tl.constexpr):
    b, h, kv_head, first, last, i, i_ok, q_rows = _query_block(length, heads, kv_heads, BLOCK_M)
    q = _load_rows(Q, q_rows, i_ok, head_dim, BLOCK_D)  # [BM, BD]
    do = _load_rows(DO, q_rows, i_ok, head_dim, BLOCK_D)
    row_stats = (b.to(tl.int64) * heads + h) * length + i
    lse = tl.load(LSE + row_stats, mask=i_ok, other=0.0)
    delta = tl.load(DELTA + row_stats, mask=i_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _query_grad_sequence(dq, q, do, lse, delta, i, first, last, K, V, b, kv_head, length, kv_heads,
                              0, window - 1, qk_scale, head_dim, BLOCK_D, BLOCK_N, PRECISION)
    if HAS_FADING:
        dq = _query_grad_sequence(dq, q, do, lse, delta, i, first, last, KF, VF, b, kv_head, length, kv_heads,
                                  window, window + fading_span - 1, qk_scale, head_dim, BLOCK_D, BLOCK_N, PRECISION)
    _store_rows(DQ, q_rows, i_ok, dq * sm_scale, head_dim, BLOCK_D)
    if HAS_MEMORY:
        qm = _load_rows(QM, q_rows, i_ok, head_dim, BLOCK_D)
        dqm = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dqm = _query_grad_memory(dqm, qm, do, lse, delta, i, first, last, MK, MV, MPOS, b, kv_head, length, kv_heads,
                                 n_chunks, slots, window, chunk_size, qk_scale, head_dim, BLOCK_D, BLOCK_N, PRECISION)
        _store_rows(DQM, q_rows, i_ok, dqm * sm_scale, head_dim, BLOCK_D)


@triton.jit
def _backward_keys(Q, K, V, DO, LSE, DELTA, DK, DV, length, heads, kv_heads, near, far, qk_scale, sm_scale,
                   head_dim, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    b = tl.program_id(0) // kv_heads
    kv_head = tl.program_id(0) % kv_heads
    group = heads // kv_heads
    first = tl.program_id(1) * BLOCK_N
    last = tl.minimum(first + BLOCK_N, length) - 1
    j = first + tl.arange(0, BLOCK_N)  # key positions [BN]
    j_ok = j < length
    kv_rows = (b.to(tl.int64) * length + j) * kv_heads + kv_head
    k = _load_rows(K, kv_rows, j_ok, head_dim, BLOCK_D)
    v = _load_rows(V, kv_rows, j_ok, head_dim, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = kv_head * group + g
        for start in range(first + near, tl.minimum(last + far, length - 1) + 1, BLOCK_M):
            i = start + tl.arange(0, BLOCK_M)  # the queries that may see these keys [BM]
            i_ok = i < length
            q_rows = (b.to(tl.int64) * length + i) * heads + h
            q = _load_rows(Q, q_rows, i_ok, head_dim, BLOCK_D)
            do = _load_rows(DO, q_rows, i_ok, head_dim, BLOCK_D)
            row_stats = (b.to(tl.int64) * heads + h) * length + i
            lse = tl.load(LSE + row_stats, mask=i_ok, other=0.0)
            delta = tl.load(DELTA + row_stats, mask=i_ok, other=0.0)
            visible_t = _sequence_visible(i[None, :], j[:, None], near, far, length)
            dk, dv = _key_grad_tile(dk, dv, k, v, q, do, lse, delta, visible_t, qk_scale, PRECISION)
    _store_rows(DK, kv_rows, j_ok, dk * sm_scale, head_dim, BLOCK_D)
    _store_rows(DV, kv_rows, j_ok, dv, head_dim, BLOCK_D)


@triton.jit
def _backward_memory(QM, MK, MV, MPOS, DO, LSE, DELTA, DMK, DMV,
                     length, heads, kv_heads, n_chunks, slots, window, chunk_size, qk_scale, sm_scale,
                     head_dim, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    b = tl.program_id(0) // kv_heads
    kv_head = tl.program_id(0) % kv_heads
    chunk = tl.program_id(2)
    group = heads // kv_heads
    s = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # slots [BN]
    s_ok = s < slots
    chunk_base = (b.to(tl.int64) * n_chunks + chunk) * slots
    pos = tl.load(MPOS + chunk_base + s, mask=s_ok, other=-1)
    mem_rows = (chunk_base + s) * kv_heads + kv_head
    mk = _load_rows(MK, mem_rows, s_ok, head_dim, BLOCK_D)
    mv = _load_rows(MV, mem_rows, s_ok, head_dim, BLOCK_D)
    dmk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dmv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = chunk * chunk_size
    last = tl.minimum(first + chunk_size, length) - 1
    for g in range(group):
        h = kv_head * group + g
        for start in range(first, last + 1, BLOCK_M):
            i = start + tl.arange(0, BLOCK_M)  # the chunk's queries [BM]
            i_ok = i < length
            q_rows = (b.to(tl.int64) * length + i) * heads + h
            qm = _load_rows(QM, q_rows, i_ok, head_dim, BLOCK_D)
            do = _load_rows(DO, q_rows, i_ok, head_dim, BLOCK_D)
            row_stats = (b.to(tl.int64) * heads + h) * length + i
            lse = tl.load(LSE + row_stats, mask=i_ok, other=0.0)
            delta = tl.load(DELTA + row_stats, mask=i_ok, other=0.0)
            visible_t = _memory_visible(i[None, :], pos[:, None], s_ok[:, None], chunk, window, chunk_size, length)
            dmk, dmv = _key_grad_tile(dmk, dmv, mk, mv, qm, do, lse, delta, visible_t, qk_scale, PRECISION)
    _store_rows(DMK, mem_rows, s_ok, dmk * sm_scale, head_dim, BLOCK_D)
    _store_rows(DMV, mem_rows, s_ok, dmv, head_dim, BLOCK_D)


# The kernels as two custom operators (forward, backward) with the backward registered as the
# forward's autograd formula: torch.compile keeps them whole in its graph (fake tensors give their
# shapes) instead of tracing into Triton's launcher. Inputs of any layout (each operator makes them
# contiguous), a finite ``window``; without ``q_mem`` the memory slots are scored with ``q``,
# whose gradient gets both parts.

GRAD_INPUTS = 8  # q, k, v, kf, vf, q_mem, mem_k, mem_v: the inputs with a gradient, in this order


@torch.library.custom_op("bmojo::union_attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, kf: Tensor | None, vf: Tensor | None, q_mem: Tensor | None,
                       mem_k: Tensor | None, mem_v: Tensor | None, mem_pos: Tensor | None, window: int,
                       fading_span: int, chunk_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [b, l, h, dh], lse [b, h, l])``: the attention and each row's base-2 log-sum-exp,
    contiguous whatever the inputs' layout."""
    q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos = contiguous(q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos)
    b, l, h, dh = q.shape
    has_fading, has_memory = kf is not None, mem_k is not None
    n_chunks, slots = (mem_k.shape[1], mem_k.shape[2]) if has_memory else (1, 0)
    out = torch.empty_like(q, dtype=v.dtype)  # [b, l, h, dh]
    lse = torch.empty(b, h, l, device=q.device, dtype=torch.float32)  # base-2 log-sum-exp per row
    block_d, block_m, block_n = _block_sizes(dh, q.dtype)
    _forward[(b * h, triton.cdiv(l, block_m))](
        q, k, v, *_or(q, kf, vf, q_mem, mem_k, mem_v, mem_pos), out, lse,
        l, h, k.shape[2], n_chunks, slots, window, fading_span, chunk_size, scale * LOG2E,
        head_dim=dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_FADING=has_fading,
        HAS_MEMORY=has_memory, PRECISION=_precision(q.dtype))
    return out, lse


@_attention_forward.register_fake
def _attention_forward_shapes(q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, window, fading_span, chunk_size, scale):
    b, l, h, _ = q.shape
    return q.new_empty(q.shape, dtype=v.dtype), q.new_empty(b, h, l, dtype=torch.float32)


def _wanted(inputs: list[Tensor | None], needs: list[bool]) -> list[bool]:
    """Which of the :data:`GRAD_INPUTS` get a gradient: those present and needed; without
    ``q_mem`` its part is added to ``dq``."""
    return [t is not None and need for t, need in zip(inputs, needs, strict=True)]


@torch.library.custom_op("bmojo::union_attention_backward", mutates_args=())
def _attention_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kf: Tensor | None, vf: Tensor | None,
                        q_mem: Tensor | None, mem_k: Tensor | None, mem_v: Tensor | None, mem_pos: Tensor | None,
                        out: Tensor, lse: Tensor, window: int, fading_span: int, chunk_size: int, scale: float,
                        needs: list[bool]) -> list[Tensor]:
    """The gradients of the :data:`GRAD_INPUTS` in their order, an empty tensor for each one
    absent or not in ``needs``: a kernel runs only for the inputs whose gradient is wanted. Contiguous."""
    d_out, q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, out, lse = contiguous(
        d_out, q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, out, lse)
    b, l, h, dh = q.shape
    hkv = k.shape[2]
    has_fading, has_memory = kf is not None, mem_k is not None
    n_chunks, slots = (mem_k.shape[1], mem_k.shape[2]) if has_memory else (1, 0)
    want = _wanted([q, k, v, kf, vf, q_mem, mem_k, mem_v], needs)
    block_d, block_m, block_n = _block_sizes(dh, q.dtype)
    tiles = dict(head_dim=dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype))
    delta = (d_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [b, h, l]: Σ_d dO·O
    scoring_query = q if q_mem is None else q_mem  # what scores the memory slots
    grads = [q.new_empty(0)] * GRAD_INPUTS
    if want[0] or want[5]:
        dq = torch.empty_like(q)
        dq_mem = torch.empty_like(q) if has_memory else None
        _backward_query[(b * h, triton.cdiv(l, block_m))](
            q, k, v, *_or(q, kf, vf, scoring_query, mem_k, mem_v, mem_pos), d_out, lse, delta, dq, *_or(q, dq_mem),
            l, h, hkv, n_chunks, slots, window, fading_span, chunk_size, scale * LOG2E, scale,
            HAS_FADING=has_fading, HAS_MEMORY=has_memory, **tiles)
        if q_mem is None and has_memory:
            dq += dq_mem
        grads[0] = dq
        if q_mem is not None:
            grads[5] = dq_mem
    key_sets = [(1, k, v, 0, window - 1)] + ([(3, kf, vf, window, window + fading_span - 1)] if has_fading else [])
    for index, keys, values, near, far in key_sets:
        if want[index] or want[index + 1]:
            dk, dv = torch.empty_like(keys), torch.empty_like(values)
            _backward_keys[(b * hkv, triton.cdiv(l, block_n))](
                q, keys, values, d_out, lse, delta, dk, dv, l, h, hkv, near, far, scale * LOG2E, scale, **tiles)
            grads[index], grads[index + 1] = dk, dv
    if want[6] or want[7]:
        d_mem_k, d_mem_v = torch.empty_like(mem_k), torch.empty_like(mem_v)
        _backward_memory[(b * hkv, triton.cdiv(slots, block_n), n_chunks)](
            scoring_query, mem_k, mem_v, mem_pos, d_out, lse, delta, d_mem_k, d_mem_v,
            l, h, hkv, n_chunks, slots, window, chunk_size, scale * LOG2E, scale, **tiles)
        grads[6], grads[7] = d_mem_k, d_mem_v
    return [grad if wanted else q.new_empty(0) for grad, wanted in zip(grads, want, strict=True)]


@_attention_backward.register_fake
def _attention_backward_shapes(d_out, q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, out, lse, window, fading_span,
                               chunk_size, scale, needs):
    inputs = [q, k, v, kf, vf, q_mem, mem_k, mem_v]
    return [dense_like(t) if wanted else q.new_empty(0)
            for t, wanted in zip(inputs, _wanted(inputs, needs), strict=True)]


def _save_for_backward(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    *tensors, window, fading_span, chunk_size, scale = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.args = (window, fading_span, chunk_size, scale)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient allocated for the log-sum-exp


def _gradients(ctx, d_out: Tensor | None, _d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    if d_out is None:  # no gradient came back for the output (e.g. a later Function returned None)
        return (None,) * (GRAD_INPUTS + 5)
    needs = list(ctx.needs_input_grad[:GRAD_INPUTS])
    grads = _attention_backward(d_out, *ctx.saved_tensors, *ctx.args, needs)
    wanted = _wanted(list(ctx.saved_tensors[:GRAD_INPUTS]), needs)
    return *(grad if want else None for grad, want in zip(grads, wanted, strict=True)), None, None, None, None, None


_attention_forward.register_autograd(_gradients, setup_context=_save_for_backward)


def _or(placeholder: Tensor, *tensors: Tensor | None) -> list[Tensor]:
    """``tensors`` with ``placeholder`` for the missing ones: a kernel takes a pointer for every
    key set, and reads only those its flags enable."""
    return [placeholder if t is None else t for t in tensors]


def _block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_M, BLOCK_N)``: the head dimension padded to a power of two (>= 16, the
    smallest ``tl.dot``), and tiles of as many rows as keep the backward's shared memory under
    the 99 KB of sm_86/89 at sm_90's count. 16-bit inputs: 64 rows up to 64-dim heads, 32 beyond
    (74 KB at 256). float32, whose full-precision products run on the CUDA cores: 32 rows up to
    64-dim heads (54 KB; 64 rows needed 115 KB and compiled 3-4x slower), 16 rows beyond (the
    smallest ``tl.dot``; 32 rows needed 103 KB at 128 and 201 KB at 256)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        block = 32 if block_d <= 64 else 16
    else:
        block = 64 if block_d <= 64 else 32
    return block_d, block, block


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: full float32 for float32 inputs (matching the CPU reference;
    TF32 would not), the tensor cores' native product for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def union_attention_triton(
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
    """Same arguments and result as :func:`bmojo.ops.attention.union_attention_reference`,
    computed by this module's kernels. ``[b, l, h, dh]`` in ``v``'s dtype; under autocast every
    input is first cast to autocast's dtype, as its matmuls would be."""
    _check_inputs(q, k, v, window, fading_span, kf, vf, mem_k, mem_v, mem_pos, chunk_size)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v, kf, vf, mem_k, mem_v, q_mem = (None if t is None else t.to(dtype)
                                                for t in (q, k, v, kf, vf, mem_k, mem_v, q_mem))
    features = [t for t in (q, k, v, kf, vf, mem_k, mem_v, q_mem) if t is not None]
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in features):
        raise ValueError(f"union_attention_triton needs q, k, v, kf, vf, mem_k, mem_v, q_mem in one dtype of "
                         f"{SUPPORTED_DTYPES}; got {sorted({str(t.dtype) for t in features})}")
    b, l, h, dh = q.shape
    if k.shape[:2] != (b, l) or k.shape[3] != dh or (q_mem is not None and q_mem.shape != q.shape):
        raise ValueError(f"k, v must be [b, l, hkv, dh] and q_mem [b, l, h, dh] for q {tuple(q.shape)}; got k "
                         f"{tuple(k.shape)}" + ("" if q_mem is None else f", q_mem {tuple(q_mem.shape)}"))
    if any(t.device != q.device for t in features + ([mem_pos] if mem_pos is not None else [])):
        raise ValueError("union_attention_triton needs every tensor on q's device")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"union_attention_triton runs on CUDA tensors, got {q.device} (Triton's CPU interpreter "
                         f"needs TRITON_INTERPRET=1 set before bmojo.ops.attention_triton is imported)")
    window = l if window is None else window  # full causal: a window over the whole sequence
    scale = dh**-0.5 if scale is None else scale
    return _attention_forward(q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, window, fading_span, chunk_size, scale)[0]


def cuda_builds(dtype: torch.dtype = torch.bfloat16, head_dim: int = 64) -> list[tuple]:
    """Each kernel with the constants of ``head_dim``-dim heads in ``dtype``, fading tokens and
    memory on, for :mod:`bmojo.ops.triton_build`."""
    block_d, block_m, block_n = _block_sizes(head_dim, dtype)
    tiles = dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(dtype))
    flags = dict(HAS_FADING=True, HAS_MEMORY=True)
    pointers = {"MPOS": "*i64", "LSE": "*fp32", "DELTA": "*fp32"}
    element = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    return [(kernel, constants, pointers, element) for kernel, constants in (
        (_forward, {**tiles, **flags}), (_backward_query, {**tiles, **flags}), (_backward_keys, tiles),
        (_backward_memory, tiles))]
