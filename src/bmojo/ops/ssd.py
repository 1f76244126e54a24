"""Mamba-2 state-space duality (SSD) scan: the fading memory of DESIGN.md §3.1.

Recurrence (per batch row and head, state ``S`` of shape ``[p, n]``)::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t ⊗ B_t
    y_t = S_t · C_t + D * x_t

Three functions compute it:

- :func:`ssd_step`: one time step (decoding);
- :func:`ssd_sequential`: the reference, a Python loop over :func:`ssd_step`;
- :func:`ssd_chunked`: the fast path, the chunked SSD algorithm (quadratic attention-like
  form inside chunks of ``chunk_size`` positions, a linear recurrence over chunk states),
  with its backward written out (:class:`_ChunkScan`), or with ``kernel="triton"`` the same
  scan as Triton kernels for CUDA (:mod:`bmojo.ops.ssd_triton`).

Whatever the input dtype, and with autocast disabled inside, all computation happens in
float32 or wider (float64 inputs are computed in float64) (DESIGN.md §8.5); outputs are
returned in the dtype of ``x`` and states in the accumulation dtype.

Shapes: ``x [b, l, h, p]``, ``dt [b, l, h]`` (already positive), ``A [h]`` (negative),
``B, C [b, l, g, n]`` with ``h % g == 0`` (head ``i`` reads group ``i // (h // g)``),
``D [h]``, states ``[b, h, p, n]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from bmojo.ops.layout import contiguous_cast


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [b, l, h, p], got shape {tuple(x.shape)}")
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be [b, l, h] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [h] = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [b, l, g, n], got {tuple(B.shape)}, {tuple(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"number of heads {h} must be a multiple of number of groups {B.shape[2]}")


def _without_autocast(fn):
    """Run ``fn(x, ...)`` with autocast off, so its matmuls stay in the accumulation dtype."""

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def _heads_from_groups(t: Tensor, nheads: int) -> Tensor:
    """[..., g, n] -> [..., h, n]: head i reads group i // (h // g)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


@_without_autocast
def ssd_step(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    state: Tensor,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence. ``x [b, h, p]``, ``dt [b, h]``, ``B, C [b, g, n]``,
    ``state [b, h, p, n]``. Returns ``(y [b, h, p], new_state [b, h, p, n])``."""
    h = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    xf, dtf = x.to(acc), dt.to(acc)
    Bh = _heads_from_groups(B.to(acc), h)  # [b, h, n]
    Ch = _heads_from_groups(C.to(acc), h)  # [b, h, n]
    decay_t = decay(dtf * A.to(acc))  # [b, h]
    new_state = decay_t[..., None, None] * state.to(acc) + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(acc)[:, None] * xf
    return y.to(x.dtype), new_state


@_without_autocast
def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference scan: :func:`ssd_step` applied position by position. Returns
    ``(y [b, l, h, p], final_state [b, h, p, n])``."""
    _check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    n = B.shape[-1]
    acc = accumulation_dtype(x.dtype)
    state = x.new_zeros(b, h, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(l):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, state


# The Mamba-2 mixer's default chunk: the fastest on CPU, forward+backward, for every state size
# measured (docs/performance.md).
SSD_CHUNK_SIZE = 32


def _decay_floor(dtype: torch.dtype) -> int:
    """The lowest log-decay whose ``exp`` is a normal number of ``dtype`` (-87 for float32)."""
    return math.ceil(math.log(torch.finfo(dtype).tiny))


def decay(log_decay: Tensor) -> Tensor:
    """``exp(log_decay)`` with results below the dtype's normal range flushed to zero.

    Identical to ``torch.exp`` except that a subnormal result is 0, as under flush-to-zero.
    The reason is speed: on the project's CPU machine PyTorch's float32 ``exp`` of an argument
    just below ``log(finfo.tiny)`` (about -87.3, which a decay summed over a chunk often is)
    runs about 30x slower than in range, and of ``-inf`` about 2x (docs/performance.md).
    """
    floor = _decay_floor(log_decay.dtype)
    return torch.where(log_decay >= floor, torch.exp(log_decay.clamp(min=floor)), 0.0)


def decay_matrix(a: Tensor) -> Tensor:
    """``[..., T] -> [..., T, T]``: ``exp(a[j+1] + ... + a[i])`` for ``i >= j`` and ``0``
    above the diagonal, the causal decay inside a chunk (flushed to zero below the normal
    range, as :func:`decay`).

    Computed as a difference of cumulative sums: the sums are taken in float64 and split into
    a rounded part and its remainder, each subtracted in the input's dtype. A short segment's
    sum so keeps the input dtype's relative precision after a long run of large decays
    (a plain float32 difference would lose it) without any ``[T, T]`` float64 tensor.
    Not differentiable (in-place); :class:`_ChunkScan` writes its gradient out. ``a`` is in an
    accumulation dtype (float32 or float64), where the parked log-decay below is representable.
    """
    if a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"decay_matrix computes in float32 or float64, got {a.dtype}")
    T = a.shape[-1]
    a_cumsum = torch.cumsum(a.double(), dim=-1)
    rounded = a_cumsum.to(a.dtype)
    remainder = (a_cumsum - rounded.double()).to(a.dtype)
    diff = rounded[..., :, None] - rounded[..., None, :]  # [..., i, j]
    diff += remainder[..., :, None]
    diff -= remainder[..., None, :]
    # Entries to zero (above the diagonal, or below the floor) are parked at a log-decay whose
    # exp is normal (fast) and below every kept entry's, and cut after the exp by one
    # threshold: with a boolean mask and masked_fill_ this function took 1.6x as long.
    below_floor, parked, cut = _PARKING[a.dtype]
    diff += torch.full((T, T), -math.inf, dtype=a.dtype, device=a.device).triu_(1)  # -inf above the diagonal
    F.threshold_(diff, below_floor, parked)  # keeps diff > below_floor, i.e. diff >= floor
    return F.threshold_(diff.exp_(), cut, 0.0)


def _parking(dtype: torch.dtype) -> tuple[float, float, float]:
    """For :func:`decay_matrix` in ``dtype``: the largest number below the floor, a parked
    log-decay between ``log(tiny)`` and the floor (its exp is normal), and a cut between
    the exps of the parked value and of the floor."""
    floor, log_tiny = _decay_floor(dtype), math.log(torch.finfo(dtype).tiny)
    parked = (floor + log_tiny) / 2
    below_floor = torch.nextafter(torch.tensor(float(floor), dtype=dtype), torch.tensor(-math.inf, dtype=dtype))
    return below_floor.item(), parked, math.exp((floor + parked) / 2)


# Computed once, at import: under torch.compile a host read (`.item()`) in decay_matrix would
# break the graph at every SSD call.
_PARKING = {dtype: _parking(dtype) for dtype in (torch.float32, torch.float64)}


def _grouped(t: Tensor, g: int) -> Tensor:
    """[b, h, ...] -> [b, g, h/g, ...]: the heads of each group of ``B``/``C`` together."""
    return t.view(t.shape[0], g, t.shape[1] // g, *t.shape[2:])


def _heads(t: Tensor) -> Tensor:
    """[b, g, h/g, ...] -> [b, h, ...]."""
    return t.flatten(1, 2)


def _per_head(t: Tensor) -> Tensor:
    """[b, g, ...] -> [b, g, 1, ...]: broadcasts over a group's heads."""
    return t.unsqueeze(2)


def _chunk_scan_forward(x_dt: Tensor, a: Tensor, Bc: Tensor, Cc: Tensor, initial_state: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-4 of :func:`ssd_chunked` on chunked inputs (shapes in :class:`_ChunkScan`).
    Returns ``(y [b, h, c, Q, p], entering states [b, h, c, p, n], final state [b, h, p, n],
    in-chunk decays [b, h, c, Q, Q])``."""
    g = Bc.shape[1]
    a_cumsum = torch.cumsum(a, dim=-1)  # [b, h, c, Q]

    # 1. Within each chunk: y_i += sum_{j <= i} (C_i · B_j) exp(a_{j+1} + ... + a_i) dt_j x_j.
    cb = Cc @ Bc.mT  # [b, g, c, Q(i), Q(j)], once per group
    L = decay_matrix(a)  # [b, h, c, Q, Q]
    y = _heads(_per_head(cb) * _grouped(L, g)) @ x_dt  # [b, h, c, Q, p]

    # 2. State contributed by each chunk alone, at its end: sum_j decay_j dt_j x_j ⊗ B_j.
    decay_to_end = decay(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, Q]
    chunk_states = _heads(_grouped(x_dt * decay_to_end[..., None], g).mT @ _per_head(Bc))  # [b, h, c, p, n]

    # 3. Recurrence over chunks, O(c): the state entering each chunk, and the final state.
    # One fused multiply-add per chunk on views unbound once (indexing inside the loop would
    # cost several dispatched ops per chunk), stacked at the end.
    chunk_decay = decay(a_cumsum[..., -1])[..., None, None]  # [b, h, c, 1, 1]: decay across a whole chunk
    states = [initial_state]  # states[c]: entering chunk c; the last one leaves the sequence
    for decay_c, added_c in zip(chunk_decay.unbind(2), chunk_states.unbind(2), strict=True):
        states.append(torch.addcmul(added_c, decay_c, states[-1]))
    entering, state = torch.stack(states[:-1], 2), states[-1]  # [b, h, c, p, n], [b, h, p, n]

    # 4. Contribution of the entering state to each position of the chunk, added into a new
    # tensor: PyTorch 2.11 compiles a Function whose forward modifies its output in place to
    # wrong gradients (pytorch/pytorch#180642; tests/ops/test_ssd.py).
    from_entering = _heads(_per_head(Cc) @ _grouped(entering, g).mT)  # [b, h, c, Q, p]
    y = torch.addcmul(y, from_entering, decay(a_cumsum)[..., None])
    return y, entering, state, L


class _ChunkScan(torch.autograd.Function):
    """The chunked SSD on chunked inputs, with its backward written out.

    ``x_dt [b, h, c, Q, p]`` (``dt·x``), ``a [b, h, c, Q]`` (``dt·A``), ``Bc, Cc [b, g, c, Q, n]``,
    ``initial_state [b, h, p, n]`` -> ``(y [b, h, c, Q, p], final_state [b, h, p, n])``.

    Autograd through :func:`_chunk_scan_forward` would keep every ``[Q, Q]`` intermediate, and
    its loop over chunks would make the backward add a zero-filled gradient of all chunk states
    per chunk (``O(c²)`` memory traffic). This saves the inputs, the entering states and the
    in-chunk decays ``L`` only, and runs the chunk recurrence backwards in one loop. Tested equal,
    outputs and gradients, to :func:`ssd_sequential` (tests/ops/test_ssd.py).
    """

    @staticmethod
    def forward(ctx, x_dt: Tensor, a: Tensor, Bc: Tensor, Cc: Tensor, initial_state: Tensor):
        y, entering, final_state, L = _chunk_scan_forward(x_dt, a, Bc, Cc, initial_state)
        ctx.save_for_backward(x_dt, a, Bc, Cc, entering, L)
        return y, final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, d_final: Tensor):
        x_dt, a, Bc, Cc, entering, L = ctx.saved_tensors
        g = Bc.shape[1]
        dy = dy.contiguous()  # a strided gradient would make every batched matmul below copy per matrix
        a_cumsum = torch.cumsum(a, dim=-1)  # [b, h, c, Q]
        decay_to_end = decay(a_cumsum[..., -1:] - a_cumsum)  # [b, h, c, Q]
        chunk_decay = decay(a_cumsum[..., -1])  # [b, h, c]

        # 4. y += (C·E^T) ∘ exp(cumsum a): gradients of C, of the entering states E and of cumsum a.
        dy_decayed = dy * decay(a_cumsum)[..., None]  # [b, h, c, Q, p]
        dy_E = _grouped(dy_decayed @ entering, g)  # [b, g, h/g, c, Q, n]
        dCc = dy_E.sum(2)  # [b, g, c, Q, n]
        d_cumsum = _heads((dy_E * _per_head(Cc)).sum(-1))  # [b, h, c, Q]
        d_entering = _heads(_grouped(dy_decayed, g).mT @ _per_head(Cc))  # [b, h, c, p, n]

        # 3. The recurrence backwards: d chunk_states[c] is the gradient of the state after chunk c.
        grads = [d_final]  # grads[i]: of the state after chunk c - 1 - i; the last one of the initial state
        for decay_c, d_entering_c in zip(reversed(chunk_decay[..., None, None].unbind(2)),
                                         reversed(d_entering.unbind(2)), strict=True):
            grads.append(torch.addcmul(d_entering_c, decay_c, grads[-1]))
        d_chunk_states = torch.stack(grads[-2::-1], 2)  # [b, h, c, p, n]
        d_initial = grads[-1]
        d_cumsum[..., -1] += (d_chunk_states * entering).sum((-1, -2)) * chunk_decay

        # 2. chunk_states = (x_dt ∘ decay_to_end)^T B.
        d_weighted_x = _heads(_per_head(Bc) @ _grouped(d_chunk_states, g).mT)  # [b, h, c, Q, p]
        dBc = _grouped((x_dt * decay_to_end[..., None]) @ d_chunk_states, g).sum(2)  # [b, g, c, Q, n]
        dx_dt = d_weighted_x * decay_to_end[..., None]
        d_to_end = (d_weighted_x * x_dt).sum(-1) * decay_to_end  # [b, h, c, Q]
        d_cumsum -= d_to_end
        d_cumsum[..., -1] += d_to_end.sum(-1)

        # 1. y = S x_dt with S = (C B^T) ∘ L, L[i, j] = exp(cumsum_i - cumsum_j) for i >= j.
        cb = Cc @ Bc.mT  # [b, g, c, Q, Q]
        L = _grouped(L, g)  # [b, g, h/g, c, Q, Q]
        scores = _heads(_per_head(cb) * L)  # [b, h, c, Q, Q]
        dx_dt += scores.mT @ dy
        d_scores = dy @ x_dt.mT  # [b, h, c, Q, Q]
        d_cb = (_grouped(d_scores, g) * L).sum(2)  # [b, g, c, Q, Q]
        dCc += d_cb @ Bc
        dBc += d_cb.mT @ Cc
        d_log_L = d_scores.mul_(scores)  # d loss / d (cumsum_i - cumsum_j)
        d_cumsum += d_log_L.sum(-1) - d_log_L.sum(-2)

        da = d_cumsum.flip(-1).cumsum(-1).flip(-1)  # cumsum_i = a_0 + ... + a_i
        return dx_dt, da, dBc, dCc, d_initial if ctx.needs_input_grad[4] else None


SSD_KERNELS = ("torch", "triton")


def chunk_scan_for(kernel: str) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The scan of :func:`ssd_chunked` by name, ``(x_dt, a, Bc, Cc, initial_state) -> (y,
    final_state)``: :class:`_ChunkScan` (``"torch"``) or
    :func:`bmojo.ops.ssd_triton.chunk_scan_triton` (``"triton"``, which needs triton installed,
    else a ``ValueError`` here, and CUDA tensors, else a ``ValueError`` at its first call)."""
    if kernel == "torch":
        return _ChunkScan.apply
    if kernel == "triton":
        try:
            from bmojo.ops.ssd_triton import chunk_scan_triton
        except ImportError as err:
            raise ValueError(str(err)) from None
        return chunk_scan_triton
    raise ValueError(f"unknown SSD kernel {kernel!r}: must be one of {SSD_KERNELS}")


@_without_autocast
def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    kernel: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Chunked SSD (Mamba-2, Dao & Gu 2024, "SSD minimal" form), any length ``l``.

    The sequence is padded to a multiple of ``chunk_size`` with ``dt = 0`` (no decay, no
    input), which leaves the final state unchanged. Returns
    ``(y [b, l, h, p], final_state [b, h, p, n])``.

    Everything is laid out head-major and contiguous (``[b, h, c, Q, *]``, one copy in and
    one out), so every product is a plain batched matmul; ``C·B`` is computed once per
    group and broadcast over the group's heads. The scan itself is :class:`_ChunkScan`,
    whose backward is written out, or its Triton kernels (``kernel="triton"``: CUDA, float32
    accumulation, a ``chunk_size`` that is a power of two >= 16).
    """
    _check_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scan = chunk_scan_for(kernel)
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    out_dtype = x.dtype
    Q = chunk_size
    pad = (-l) % Q
    nc = (l + pad) // Q
    acc = accumulation_dtype(x.dtype)

    def chunked(t: Tensor) -> Tensor:  # [b, l, k, e] -> [b, k, c, Q, e], padded with zeros, contiguous
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        # One copy casts and lays out head-major: a permute then reshape alone is a strided
        # view, which every batched matmul below would copy again, once per use.
        t = contiguous_cast(t.permute(0, 2, 1, 3), acc)
        return t.view(b, t.shape[1], nc, Q, t.shape[3])

    dtf = dt.to(acc)
    x_dt = chunked(x * dtf[..., None])  # [b, h, c, Q, p]
    Bc, Cc = chunked(B), chunked(C)  # [b, g, c, Q, n]
    a = chunked((dtf * A.to(acc))[..., None])[..., 0]  # [b, h, c, Q]
    state = x.new_zeros(b, h, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)
    y, final_state = scan(x_dt, a, Bc, Cc, state)

    y = y.view(b, h, nc * Q, p).transpose(1, 2)[:, :l]  # [b, l, h, p]
    if D is not None:
        # x in its own dtype: the product promotes it to acc exactly, and autograd keeps x, not a copy in acc.
        y = y + D.to(acc)[:, None] * x
    return y.to(out_dtype), final_state
