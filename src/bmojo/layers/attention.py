"""Softmax attention layer: full causal (`A`) or sliding window (`W`), DESIGN.md §6.

GQA, RoPE at absolute positions, optional per-head QK RMSNorm. The parallel path uses
:func:`bmojo.ops.union_attention_chunked` with no fading tokens and no eidetic memory (a window
with ``attention_kernel="triton"``: :func:`bmojo.ops.attention_triton.union_attention_triton`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bmojo.layers.kv_buffer import KVBuffer
from bmojo.layers.norm import RMSNorm
from bmojo.ops.attention import ATTENTION_KERNELS, attention_continued, union_attention_for, union_attention_step
from bmojo.ops.rope import apply_rope, rope_angles


class Attention(nn.Module):
    """``[B, L, d_model] -> [B, L, d_model]``. ``window=None`` is full causal attention."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        window: int | None = None,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        block_size: int | None = None,
        norm_eps: float = 1e-5,
        attention_kernel: str = "torch",
    ):
        super().__init__()
        if d_model % n_heads != 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"need d_model % n_heads == 0 and n_heads % n_kv_heads == 0, got "
                             f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.rope_theta = rope_theta
        self.block_size = block_size or window or 64
        # The parallel form: ``attention_kernel``'s for a window; full causal attention is
        # PyTorch's SDPA (through union_attention_chunked) whichever valid kernel is chosen.
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={attention_kernel!r} is invalid: must be one of {ATTENTION_KERNELS}")
        self.parallel_attention = union_attention_for(attention_kernel if window is not None else "torch")
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, L, D]`` -> unrotated, QK-normed ``q [B, L, H, dh]``, ``k, v [B, L, Hkv, dh]``."""
        return self.split_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x))

    def split_heads(self, q_flat: Tensor, k_flat: Tensor, v_flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections ``[B, L, H*dh]``, ``[B, L, Hkv*dh]`` (twice) -> heads, QK-norm applied."""
        q = q_flat.unflatten(-1, (self.n_heads, self.head_dim))
        k = self.project_key(k_flat)
        v = v_flat.unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q, k, v

    def project_key(self, k_flat: Tensor) -> Tensor:
        """``[..., Hkv*dh]`` -> ``[..., Hkv, dh]`` with the key QK-norm applied."""
        k = k_flat.unflatten(-1, (self.n_kv_heads, self.head_dim))
        return k if self.k_norm is None else self.k_norm(k)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_angles(positions, self.head_dim, self.rope_theta)

    def forward(self, x: Tensor, cache: KVBuffer | None = None, start: int = 0) -> Tensor:
        """Parallel form over ``x [B, L, D]`` at positions ``start .. start+L-1``. With a
        ``cache``: from ``start = 0`` it is filled (prefill); from ``start > 0`` the sequence
        continues from the ``start`` positions it holds (continued prefill), then it is updated."""
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v = self.project_qkv(x)
        cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and start > 0:
            past_k, past_v = cache.read(start - min(start, self.window or start), start)  # [B, n, Hkv, dh]
            out = attention_continued(q, k, v, past_k, past_v, self.window, self.block_size,
                                      windowed=self.parallel_attention)
        else:
            out = self.parallel_attention(q, k, v, window=self.window, chunk_size=self.block_size)
        if cache is not None:
            if start == 0:
                cache.clear()
            cache.write(k, v, start)
        return self.o_proj(out.flatten(-2))

    def step(self, x: Tensor, cache: KVBuffer, position: int) -> Tensor:
        """One token ``x [B, D]`` at absolute ``position`` -> ``[B, D]``."""
        q, k, v = self.project_qkv(x[:, None])
        cos, sin = self.rope(torch.arange(position, position + 1, device=x.device))  # no host copy: no sync
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(k, v, position)
        out = union_attention_step(q[:, 0], cache.k, cache.v, cache.pos >= 0)
        return self.o_proj(out.flatten(-2))

    def new_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> KVBuffer:
        """A ring of ``window`` slots, or for full attention a growable buffer sized
        ``max_seq_len`` to start with."""
        slots = self.window if self.window is not None else max_seq_len
        return KVBuffer.empty(batch_size, slots, self.n_kv_heads, self.head_dim, growable=self.window is None,
                              device=device or self.q_proj.weight.device,
                              dtype=dtype or self.q_proj.weight.dtype)
