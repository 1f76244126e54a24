"""The chunked SSD scan of DESIGN.md §3.1 as Triton kernels (:func:`chunk_scan_triton`):
:class:`bmojo.ops.ssd._ChunkScan`'s forward and backward, one program per (batch row, head,
chunk), without the ``[Q, Q]`` decay and score matrices in memory and with the recurrence over
chunks in one launch.

Same inputs and results as ``_ChunkScan`` (:func:`bmojo.ops.ssd.ssd_chunked` lays them out):
``x_dt [b, h, c, Q, p]``, ``a [b, h, c, Q]``, ``Bc, Cc [b, g, c, Q, n]``, ``initial_state
[b, h, p, n]``, all float32 -> ``(y [b, h, c, Q, p], final_state [b, h, p, n])``.
Five kernels:

- ``_chunk_state``: the state each chunk adds at its end, ``Σ_j exp(a_{j+1} + … + a_Q) x_dt_j ⊗ B_j``;
- ``_chunk_recurrence``: ``S ← added_c + exp(Σ a_c) S`` over the chunks, forwards for the
  states entering each chunk, backwards for their gradients (the same recurrence reversed);
- ``_chunk_output``: ``y = ((C Bᵀ) ∘ L) x_dt + (C Eᵀ) ∘ exp(cumsum a)`` with ``L`` the in-chunk decays;
- ``_chunk_output_backward`` and ``_chunk_state_backward``: the gradients of those two, in the
  order of ``_ChunkScan.backward``; ``B``'s and ``C``'s gradients per head, summed over each
  group's heads in PyTorch (no atomics: the same result run to run).

Needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before this module is imported (the tests run
the kernels in Triton's CPU interpreter). The chunk length must be a power of two >= 16 (the
smallest ``tl.dot``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bmojo.ops.triton_support import contiguous, dense_like, require_triton

triton = require_triton("bmojo.ops.ssd_triton")
import triton.language as tl  # noqa: E402 (after the check that triton is there)

INTERPRETED = triton.knobs.runtime.interpret
RECURRENCE_BLOCK = 256  # state elements per program of the recurrence over chunks


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols):
    """``ptr[rows, cols]`` of a row-major ``[n_rows, n_cols]`` matrix, zeros outside."""
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=(rows < n_rows)[:, None] &
                   (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, rows, cols, n_rows, n_cols, value):
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], value,
             mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _chunk_offsets(heads, groups, n_chunks, Q, p, n):
    """This program's chunk: the element offsets of its ``[Q, p]`` rows of ``x_dt``/``y``, its
    ``[Q]`` of ``a``, its ``[Q, n]`` of its group's ``B``/``C`` and its ``[p, n]`` state."""
    bh = tl.program_id(0).to(tl.int64)  # batch row * heads + head
    chunk = tl.program_id(1)
    bg = (bh // heads) * groups + (bh % heads) // (heads // groups)  # the head's group
    rows = bh * n_chunks + chunk
    return rows * Q * p, rows * Q, (bg * n_chunks + chunk) * Q * n, rows * p * n


@triton.jit
def _chunk_state(XDT, A, B, STATES, heads, groups, n_chunks, p, n,
                 Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    x_at, a_at, b_at, s_at = _chunk_offsets(heads, groups, n_chunks, Q, p, n)
    t, pp, nn = tl.arange(0, Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    a = tl.load(A + a_at + t)  # [Q]
    to_end = tl.exp(tl.sum(a, 0) - tl.cumsum(a, 0))  # decay from each position to the chunk's end
    x = _load_tile(XDT + x_at, t, pp, Q, p)  # [Q, P]
    b = _load_tile(B + b_at, t, nn, Q, n)  # [Q, N]
    state = tl.dot(tl.trans(x * to_end[:, None]), b, input_precision="ieee")  # [P, N]
    _store_tile(STATES + s_at, pp, nn, p, n, state)


@triton.jit
def _chunk_recurrence(ADDED, DECAY, INITIAL, BEFORE, LAST, n_chunks, size,
                      BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """``BEFORE[c] = S; S = ADDED[c] + DECAY[c] · S`` for each chunk in order (``REVERSE``: last
    to first), from ``S = INITIAL``; ``LAST = S`` at the end. Grid ``(b·h, size / BLOCK)``."""
    bh = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < size
    state = tl.load(INITIAL + bh * size + offsets, mask=ok, other=0.0)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step if REVERSE else step
        at = (bh * n_chunks + chunk) * size + offsets
        tl.store(BEFORE + at, state, mask=ok)
        state = tl.load(ADDED + at, mask=ok, other=0.0) + tl.load(DECAY + bh * n_chunks + chunk) * state
    tl.store(LAST + bh * size + offsets, state, mask=ok)


@triton.jit
def _in_chunk_decay(log_decay, t):
    """``L[i, j] = exp(log_decay_i - log_decay_j)`` for ``i >= j``, 0 above the diagonal: ``[Q, Q]``."""
    causal = t[:, None] >= t[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, log_decay[:, None] - log_decay[None, :], 0.0)), 0.0)


@triton.jit
def _chunk_output(XDT, A, B, C, ENTERING, Y, heads, groups, n_chunks, p, n,
                  Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    x_at, a_at, b_at, s_at = _chunk_offsets(heads, groups, n_chunks, Q, p, n)
    t, pp, nn = tl.arange(0, Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    log_decay = tl.cumsum(tl.load(A + a_at + t), 0)
    b = _load_tile(B + b_at, t, nn, Q, n)  # [Q, N]
    c = _load_tile(C + b_at, t, nn, Q, n)
    x = _load_tile(XDT + x_at, t, pp, Q, p)  # [Q, P]
    entering = _load_tile(ENTERING + s_at, pp, nn, p, n)  # [P, N]
    scores = tl.dot(c, tl.trans(b), input_precision="ieee") * _in_chunk_decay(log_decay, t)  # [Q, Q]
    y = tl.dot(scores, x, input_precision="ieee")
    y += tl.dot(c, tl.trans(entering), input_precision="ieee") * tl.exp(log_decay)[:, None]
    _store_tile(Y + x_at, t, pp, Q, p, y)


@triton.jit
def _chunk_output_backward(XDT, A, B, C, ENTERING, DY, DX, DB, DC, DLOG, D_ENTERING,
                           heads, groups, n_chunks, p, n,
                           Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Steps 4 and 1 of ``_ChunkScan.backward``: the parts of ``dx_dt``, ``dB``, ``dC`` (per head)
    and ``d log_decay`` that come through ``y``, and the entering states' gradients."""
    x_at, a_at, b_at, s_at = _chunk_offsets(heads, groups, n_chunks, Q, p, n)
    head_b_at = (tl.program_id(0).to(tl.int64) * n_chunks + tl.program_id(1)) * Q * n  # per-head dB, dC
    t, pp, nn = tl.arange(0, Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    log_decay = tl.cumsum(tl.load(A + a_at + t), 0)
    b = _load_tile(B + b_at, t, nn, Q, n)
    c = _load_tile(C + b_at, t, nn, Q, n)
    x = _load_tile(XDT + x_at, t, pp, Q, p)
    dy = _load_tile(DY + x_at, t, pp, Q, p)
    entering = _load_tile(ENTERING + s_at, pp, nn, p, n)
    # 4. y += (C Eᵀ) ∘ exp(log_decay)
    dy_decayed = dy * tl.exp(log_decay)[:, None]  # [Q, P]
    dc = tl.dot(dy_decayed, entering, input_precision="ieee")  # [Q, N]
    d_log = tl.sum(dc * c, 1)  # [Q]
    _store_tile(D_ENTERING + s_at, pp, nn, p, n, tl.dot(tl.trans(dy_decayed), c, input_precision="ieee"))
    # 1. y = S x_dt with S = (C Bᵀ) ∘ L
    decays = _in_chunk_decay(log_decay, t)
    scores = tl.dot(c, tl.trans(b), input_precision="ieee") * decays  # [Q, Q]
    dx = tl.dot(tl.trans(scores), dy, input_precision="ieee")  # [Q, P]
    d_scores = tl.dot(dy, tl.trans(x), input_precision="ieee")  # [Q, Q]
    d_cb = d_scores * decays
    dc += tl.dot(d_cb, b, input_precision="ieee")
    db = tl.dot(tl.trans(d_cb), c, input_precision="ieee")
    d_log_decays = d_scores * scores  # d loss / d (log_decay_i - log_decay_j)
    d_log += tl.sum(d_log_decays, 1) - tl.sum(d_log_decays, 0)
    _store_tile(DX + x_at, t, pp, Q, p, dx)
    _store_tile(DB + head_b_at, t, nn, Q, n, db)
    _store_tile(DC + head_b_at, t, nn, Q, n, dc)
    tl.store(DLOG + a_at + t, d_log)


@triton.jit
def _chunk_state_backward(XDT, A, B, ENTERING, D_STATES, DX, DB, DLOG, DA, heads, groups, n_chunks, p, n,
                          Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Steps 3 (the chunk decay's part) and 2 of ``_ChunkScan.backward``, added to what
    :func:`_chunk_output_backward` stored; then ``da`` from ``d log_decay`` (a reversed cumsum)."""
    x_at, a_at, b_at, s_at = _chunk_offsets(heads, groups, n_chunks, Q, p, n)
    head_b_at = (tl.program_id(0).to(tl.int64) * n_chunks + tl.program_id(1)) * Q * n
    t, pp, nn = tl.arange(0, Q), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    a = tl.load(A + a_at + t)
    log_decay = tl.cumsum(a, 0)
    total = tl.sum(a, 0)
    to_end = tl.exp(total - log_decay)  # [Q]
    b = _load_tile(B + b_at, t, nn, Q, n)
    x = _load_tile(XDT + x_at, t, pp, Q, p)
    d_state = _load_tile(D_STATES + s_at, pp, nn, p, n)  # gradient of the state after this chunk
    entering = _load_tile(ENTERING + s_at, pp, nn, p, n)
    # 2. chunk state = (x_dt ∘ to_end)ᵀ B
    d_weighted_x = tl.dot(b, tl.trans(d_state), input_precision="ieee")  # [Q, P]
    dx = _load_tile(DX + x_at, t, pp, Q, p) + d_weighted_x * to_end[:, None]
    db = _load_tile(DB + head_b_at, t, nn, Q, n) + tl.dot(x * to_end[:, None], d_state, input_precision="ieee")
    d_to_end = tl.sum(d_weighted_x * x, 1) * to_end  # [Q]
    # 3. state after the chunk = added + exp(total) · entering; total = log_decay at the chunk's end
    at_end = tl.sum(d_to_end, 0) + tl.sum(tl.sum(d_state * entering, 1), 0) * tl.exp(total)
    d_log = tl.load(DLOG + a_at + t) - d_to_end + tl.where(t == Q - 1, at_end, 0.0)
    _store_tile(DX + x_at, t, pp, Q, p, dx)
    _store_tile(DB + head_b_at, t, nn, Q, n, db)
    # log_decay_i = a_0 + … + a_i, so da_j = Σ_{i >= j} d_log_i
    tl.store(DA + a_at + t, tl.sum(d_log, 0) - tl.cumsum(d_log, 0) + d_log)


def _tiles(Q: int, p: int, n: int) -> dict[str, int]:
    """The constexpr sizes: the chunk (checked), ``p`` and ``n`` padded to powers of two >= 16."""
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"the Triton SSD needs a chunk_size that is a power of two >= 16, got {Q}")
    return dict(Q=Q, BLOCK_P=max(16, triton.next_power_of_2(p)), BLOCK_N=max(16, triton.next_power_of_2(n)))


def _recurrence(added: Tensor, decay: Tensor, initial: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """``(before [b, h, c, p, n], last [b, h, p, n])`` of :func:`_chunk_recurrence`."""
    b, h, c, p, n = added.shape
    before, last = torch.empty_like(added), torch.empty_like(initial)
    _chunk_recurrence[(b * h, triton.cdiv(p * n, RECURRENCE_BLOCK))](
        added, decay, initial, before, last, c, p * n, BLOCK=RECURRENCE_BLOCK, REVERSE=reverse)
    return before, last


# The kernels as two custom operators (forward, backward) with the backward registered as the
# forward's autograd formula: torch.compile keeps them whole in its graph (fake tensors give their
# shapes) instead of tracing into Triton's launcher.


@torch.library.custom_op("bmojo::chunk_scan_forward", mutates_args=())
def _scan_forward(x_dt: Tensor, a: Tensor, Bc: Tensor, Cc: Tensor, initial_state: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, final_state, entering [b, h, c, p, n], chunk_decay [b, h, c])``: the scan, and what
    its backward reads (the state entering each chunk, the decay across each chunk). Every output
    contiguous, whatever the inputs' layout."""
    x_dt, a, Bc, Cc, initial_state = contiguous(x_dt, a, Bc, Cc, initial_state)
    b, h, c, Q, p = x_dt.shape
    g, n = Bc.shape[1], Bc.shape[-1]
    grid, shape = (b * h, c), (h, g, c, p, n)
    tiles = _tiles(Q, p, n)
    chunk_states = x_dt.new_empty(b, h, c, p, n)
    _chunk_state[grid](x_dt, a, Bc, chunk_states, *shape, **tiles)
    chunk_decay = a.sum(-1).exp().contiguous()  # [b, h, c]
    entering, final_state = _recurrence(chunk_states, chunk_decay, initial_state, reverse=False)
    y = torch.empty_like(x_dt)
    _chunk_output[grid](x_dt, a, Bc, Cc, entering, y, *shape, **tiles)
    return y, final_state, entering, chunk_decay


@_scan_forward.register_fake
def _scan_forward_shapes(x_dt, a, Bc, Cc, initial_state):
    b, h, c, _, p = x_dt.shape
    return dense_like(x_dt), dense_like(initial_state), x_dt.new_empty(b, h, c, p, Bc.shape[-1]), a.new_empty(b, h, c)


@torch.library.custom_op("bmojo::chunk_scan_backward", mutates_args=())
def _scan_backward(dy: Tensor, d_final: Tensor, x_dt: Tensor, a: Tensor, Bc: Tensor, Cc: Tensor, entering: Tensor,
                   chunk_decay: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x_dt, a, Bc, Cc, initial_state``, contiguous."""
    dy, d_final, x_dt, a, Bc, Cc, entering, chunk_decay = contiguous(
        dy, d_final, x_dt, a, Bc, Cc, entering, chunk_decay)
    b, h, c, Q, p = x_dt.shape
    g, n = Bc.shape[1], Bc.shape[-1]
    grid, shape = (b * h, c), (h, g, c, p, n)
    tiles = _tiles(Q, p, n)
    dx_dt, d_log, da = torch.empty_like(x_dt), torch.empty_like(a), torch.empty_like(a)
    dB_heads, dC_heads = x_dt.new_empty(b, h, c, Q, n), x_dt.new_empty(b, h, c, Q, n)
    d_entering = torch.empty_like(entering)
    _chunk_output_backward[grid](x_dt, a, Bc, Cc, entering, dy, dx_dt, dB_heads, dC_heads, d_log, d_entering,
                                 *shape, **tiles)
    d_states, d_initial = _recurrence(d_entering, chunk_decay, d_final, reverse=True)
    _chunk_state_backward[grid](x_dt, a, Bc, entering, d_states, dx_dt, dB_heads, d_log, da, *shape, **tiles)

    def per_group(t: Tensor) -> Tensor:  # [b, h, c, Q, n] -> [b, g, c, Q, n]
        return t.view(b, g, h // g, c, Q, n).sum(2)

    return dx_dt, da, per_group(dB_heads), per_group(dC_heads), d_initial


@_scan_backward.register_fake
def _scan_backward_shapes(dy, d_final, x_dt, a, Bc, Cc, entering, chunk_decay):
    return dense_like(x_dt), dense_like(a), dense_like(Bc), dense_like(Cc), dense_like(d_final)



def _save_for_backward(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
    x_dt, a, Bc, Cc, _ = inputs
    _, final_state, entering, chunk_decay = output
    ctx.save_for_backward(x_dt, a, Bc, Cc, entering, chunk_decay)
    ctx.state_shape = final_state.shape
    ctx.mark_non_differentiable(entering, chunk_decay)
    ctx.set_materialize_grads(False)  # None, not zeros, for the non-differentiable outputs and an unused one


def _gradients(ctx, dy: Tensor | None, d_final: Tensor | None, _d_entering, _d_decay) -> tuple[Tensor | None, ...]:
    x_dt, a, Bc, Cc, entering, chunk_decay = ctx.saved_tensors
    dy = torch.zeros_like(x_dt) if dy is None else dy
    d_final = x_dt.new_zeros(ctx.state_shape) if d_final is None else d_final
    dx_dt, da, dBc, dCc, d_initial = _scan_backward(dy, d_final, x_dt, a, Bc, Cc, entering, chunk_decay)
    return dx_dt, da, dBc, dCc, d_initial if ctx.needs_input_grad[4] else None


_scan_forward.register_autograd(_gradients, setup_context=_save_for_backward)


def chunk_scan_triton(x_dt: Tensor, a: Tensor, Bc: Tensor, Cc: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`bmojo.ops.ssd._ChunkScan` computed by this module's kernels: same arguments, ``(y,
    final_state)``; a ``ValueError`` for inputs the kernels do not take."""
    if x_dt.dtype != torch.float32:
        raise ValueError(f"the Triton SSD computes in float32, got {x_dt.dtype}")
    if x_dt.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton SSD runs on CUDA tensors, got {x_dt.device} (Triton's CPU interpreter "
                         f"needs TRITON_INTERPRET=1 set before bmojo.ops.ssd_triton is imported)")
    _tiles(x_dt.shape[3], x_dt.shape[4], Bc.shape[-1])  # the chunk length, checked
    y, final_state, _, _ = _scan_forward(x_dt, a, Bc, Cc, initial_state)
    return y, final_state


def cuda_builds(head_dim: int = 64, state_size: int = 64, chunk_size: int = 64) -> list[tuple]:
    """Each kernel with the constants of one model shape, for :mod:`bmojo.ops.triton_build`."""
    tiles = _tiles(chunk_size, head_dim, state_size)
    return [(kernel, constants, {}, "*fp32") for kernel, constants in (
        (_chunk_state, tiles), (_chunk_output, tiles), (_chunk_output_backward, tiles),
        (_chunk_state_backward, tiles), (_chunk_recurrence, dict(BLOCK=RECURRENCE_BLOCK, REVERSE=False)),
        (_chunk_recurrence, dict(BLOCK=RECURRENCE_BLOCK, REVERSE=True)))]
