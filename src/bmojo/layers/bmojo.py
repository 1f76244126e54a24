"""The B'MOJO mixer (DESIGN.md §3–§5, §7): sliding-window attention whose keys also hold
fading tokens (outputs of its own Mamba-2 mixer), an eidetic memory of past tokens
selected by the innovation test and, with ``storage_blocks = r > 0``, the ``r`` blocks of
stored entries best matching the previous chunk's queries, retrieved from a block store
(:mod:`bmojo.ops.storage`): the entries that left the eidetic memory
(``storage_source="evicted"``) or the raw tokens older than the window (``"raw"``).
``eidetic_capacity=0`` is B'MOJO-F (the `F` layer).

``qkv_conv = K > 0`` (an option this implementation adds to DESIGN.md §3.2, off by default)
runs a causal depthwise convolution of width ``K`` over the ``q, k, v`` projections, as
Mamba-2 does over its ``x, B, C`` and Primer over its queries, keys and values: the key
of a token can then carry the tokens just before it, so one layer's eidetic memory can
answer "which value followed this key" (docs/results.md, "A short convolution over q, k,
v").

The parameters of the attention part have the same names as :class:`Attention`'s, so a
sliding-window layer's weights load into it (DESIGN.md §8.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmojo.layers.attention import Attention
from bmojo.layers.kv_buffer import KVBuffer
from bmojo.layers.mamba2 import Mamba2Cache, Mamba2Mixer
from bmojo.ops.attention import union_attention_step
from bmojo.ops.conv import causal_depthwise_conv1d
from bmojo.ops.eidetic import (
    POLICIES,
    SELECTIONS,
    eidetic_dropped_per_chunk,
    eidetic_memory_dropped,
    eidetic_memory_per_chunk,
    eidetic_memory_update,
    empty_memory,
    innovation_scores,
    select_per_chunk,
    selection_scores,
)
from bmojo.ops.rope import apply_rope
from bmojo.ops.storage import (
    OVERFLOW_POLICIES,
    STORAGE_SOURCES,
    BlockStore,
    capacity_from_budget,
    entry_positions,
    evicted_block_count,
    gather_positions,
    raw_block_positions,
    retrieval_per_chunk,
    retrieve,
    stored_block_count,
)

EIDETIC_ROPE_MODES = ("none", "absolute", "window_edge")


@dataclass
class BMojoCache:
    """Fixed-size decoding state of one B'MOJO mixer (DESIGN.md §7)."""

    ssm: Mamba2Cache
    raw: KVBuffer  # ring of the last W keys/values (rotated keys)
    fading: KVBuffer | None  # ring of the last W+F fading keys/values; the oldest F are attended
    prev_f: Tensor  # [B, D]: SSM output at the previous position, input of the predictor
    mem_k: Tensor | None = None  # [B, M, Hkv, dh]: eidetic slots (keys as the rope mode stores them)
    mem_v: Tensor | None = None  # [B, M, Hkv, dh]
    mem_pos: Tensor | None = None  # [B, M], -1 = empty
    mem_score: Tensor | None = None  # [B, M], -inf = empty
    cand_k: Tensor | None = None  # [B, C, Hkv, dh]: the current chunk's tokens, slot = position mod C
    cand_v: Tensor | None = None  # [B, C, Hkv, dh]
    cand_score: Tensor | None = None  # [B, C]: their selection scores
    # Long-term eidetic memory in storage (DESIGN.md §5); the store itself grows, the rest is fixed.
    store: BlockStore | None = None
    # Entries not yet in the store: "raw", a ring of the last W+F+S+C tokens' k, v (as stored), by
    # position; "evicted", a ring of the last S+k dropped entries, by index in the stream of drops.
    pending: KVBuffer | None = None
    pending_pos: Tensor | None = None  # [B, S+k]: "evicted", the positions of those entries (-1: empty)
    chunk_q: Tensor | None = None  # [B, C, H, dh]: eidetic queries of the current chunk, slot = position mod C
    ret_block: Tensor | None = None  # [B, r]: blocks retrieved for the current chunk, -1 = empty
    ret_pos: Tensor | None = None  # [B, r*S]: positions of their entries, -1 = empty
    ret_k: Tensor | None = None  # [B, r*S, Hkv, dh]
    ret_v: Tensor | None = None  # [B, r*S, Hkv, dh]
    qkv_conv_state: Tensor | None = None  # [B, K-1, (H + 2 Hkv) dh]: the last K-1 q, k, v projections


class BMojoMixer(Attention):
    """``[B, L, d_model] -> [B, L, d_model]``; :meth:`forward_with_aux` also returns the
    innovation predictor's auxiliary loss (DESIGN.md §4)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        window: int,
        fading_span: int,
        chunk_size: int,
        eidetic_per_chunk: int = 0,
        eidetic_capacity: int = 0,
        eidetic_policy: str = "score",
        selection: str = "topk",
        innovation_threshold: float | None = None,
        eidetic_rope: str = "none",
        selection_seed: int = 0,
        innovation_rank: int = 0,
        ssm_residual: bool = True,
        tie_fading_proj: bool = True,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        ssm_headdim: int = 64,
        ssm_ngroups: int = 1,
        storage_blocks: int = 0,
        storage_block_size: int | None = None,
        storage_budget_bytes: int = 0,
        storage_overflow: str = "error",
        storage_source: str = "raw",
        qkv_conv: int = 0,
        attention_kernel: str = "torch",
        ssd_kernel: str = "torch",
    ):
        storage_block_size = chunk_size if storage_block_size is None else storage_block_size
        checks = [
            ("window", isinstance(window, int) and window >= 1, "an integer >= 1"),
            ("fading_span", fading_span >= 0, ">= 0"),
            ("chunk_size", chunk_size >= 1, ">= 1"),
            ("eidetic_capacity", eidetic_capacity >= 0, ">= 0"),
            ("eidetic_per_chunk", eidetic_capacity == 0 or 1 <= eidetic_per_chunk <= chunk_size,
             f"in [1, chunk_size={chunk_size}] when the layer has memory"),
            ("eidetic_capacity", eidetic_capacity == 0 or eidetic_capacity % max(eidetic_per_chunk, 1) == 0,
             f"a multiple of eidetic_per_chunk={eidetic_per_chunk}"),
            ("eidetic_policy", eidetic_policy in POLICIES, f"one of {POLICIES}"),
            ("selection", selection in SELECTIONS, f"one of {SELECTIONS}"),
            ("eidetic_rope", eidetic_rope in EIDETIC_ROPE_MODES, f"one of {EIDETIC_ROPE_MODES}"),
            ("storage_blocks", storage_blocks >= 0, ">= 0 (0: no storage)"),
            ("storage_block_size", storage_block_size >= 1, ">= 1"),
            ("storage_budget_bytes", storage_budget_bytes >= 0, ">= 0 (0: no budget)"),
            ("storage_overflow", storage_overflow in OVERFLOW_POLICIES, f"one of {OVERFLOW_POLICIES}"),
            ("storage_source", storage_source in STORAGE_SOURCES, f"one of {STORAGE_SOURCES}"),
            ("storage_source", storage_source != "evicted" or storage_blocks == 0 or eidetic_capacity > 0,
             "'raw' in a layer without eidetic memory (eidetic_capacity=0): nothing is evicted"),
            ("qkv_conv", isinstance(qkv_conv, int) and not isinstance(qkv_conv, bool) and qkv_conv >= 0,
             "an integer >= 0 (0: no convolution)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={locals()[name]!r} is invalid: must be {allowed}")
        super().__init__(d_model, n_heads, n_kv_heads, window=window, qk_norm=qk_norm, rope_theta=rope_theta,
                         block_size=chunk_size, norm_eps=norm_eps, attention_kernel=attention_kernel)
        self.fading_span = fading_span
        self.chunk_size = chunk_size
        self.eidetic_per_chunk = eidetic_per_chunk
        self.eidetic_capacity = eidetic_capacity
        self.eidetic_policy = eidetic_policy
        self.selection = selection
        self.innovation_threshold = innovation_threshold if selection == "topk" else None
        self.eidetic_rope = eidetic_rope
        self.selection_seed = selection_seed
        self.ssm_residual = ssm_residual
        self.storage_blocks = storage_blocks
        self.storage_block_size = storage_block_size
        self.storage_budget_bytes = storage_budget_bytes
        self.storage_overflow = storage_overflow
        self.storage_source = storage_source
        self.ssm = Mamba2Mixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=ssm_headdim,
                               ngroups=ssm_ngroups, ssd_kernel=ssd_kernel)
        kv_dim = n_kv_heads * self.head_dim
        untied = not tie_fading_proj and fading_span > 0
        self.kf_proj = nn.Linear(d_model, kv_dim, bias=False) if untied else None
        self.vf_proj = nn.Linear(d_model, kv_dim, bias=False) if untied else None
        self.predictor = None
        if eidetic_capacity > 0 and selection == "topk":
            # Φ: x̂_t = Φ(f_{t-1}), trained only by the auxiliary loss; zero init (x̂ = 0).
            if innovation_rank:
                self.predictor = nn.Sequential(nn.Linear(d_model, innovation_rank, bias=False),
                                               nn.Linear(innovation_rank, d_model, bias=False))
            else:
                self.predictor = nn.Sequential(nn.Linear(d_model, d_model, bias=False))
            for layer in self.predictor:
                nn.init.zeros_(layer.weight)
        self.qkv_conv = None
        if qkv_conv > 0:  # depthwise over the channels of q, k, v; PyTorch's default init, as Mamba-2's conv1d
            channels = (n_heads + 2 * n_kv_heads) * self.head_dim
            self.qkv_conv = nn.Conv1d(channels, channels, qkv_conv, groups=channels, padding=qkv_conv - 1)

    @property
    def has_memory(self) -> bool:
        return self.eidetic_capacity > 0

    @property
    def has_storage(self) -> bool:
        return self.storage_blocks > 0

    def stored_blocks(self, n: int) -> int:
        """Blocks in the store at the boundary before query chunk ``n`` (DESIGN.md §5)."""
        if self.storage_source == "evicted":
            return evicted_block_count(n, self.eidetic_per_chunk, self.storage_block_size)
        return stored_block_count(n, self.window, self.fading_span, self.chunk_size, self.storage_block_size)

    def storage_capacity(self, dtype: torch.dtype) -> int | None:
        """Blocks the byte budget holds per sequence for keys of ``dtype`` (``None``: no budget)."""
        return capacity_from_budget(self.storage_budget_bytes, self.storage_block_size, self.n_kv_heads,
                                    self.head_dim, dtype)

    def new_store(self, batch_size: int, dtype: torch.dtype, path=None) -> BlockStore:
        """An empty store for this layer, in RAM or (``path``) in a memory-mapped file."""
        return BlockStore(batch_size, self.storage_block_size, self.n_kv_heads, self.head_dim, dtype,
                          self.storage_capacity(dtype), self.storage_overflow, path)

    def open_store(self, batch_size: int, dtype: torch.dtype, path) -> BlockStore:
        """This layer's store file at ``path``, written by an earlier decode (checked)."""
        return BlockStore.open(path, batch_size, self.storage_block_size, self.n_kv_heads, self.head_dim, dtype,
                               self.storage_capacity(dtype), self.storage_overflow)

    def _dedupe(self, mem_pos: Tensor, ret_block: Tensor) -> Tensor:
        """Eidetic slots ``mem_pos [..., M]`` whose token is also in a retrieved block
        ``ret_block [..., r]`` are hidden (position ``-1``): each past token enters the union
        softmax at most once. Only raw blocks can hold one: an evicted entry has left the memory."""
        if self.storage_source == "evicted":
            return mem_pos
        block = torch.where(mem_pos >= 0, mem_pos // self.storage_block_size, -2)
        duplicate = (block[..., :, None] == ret_block[..., None, :]).any(-1)
        return mem_pos.masked_fill(duplicate, -1)

    def fading_kv(self, f: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Fading tokens: SSM outputs ``f [B, L, D]`` -> rotated ``kf``, ``vf [B, L, Hkv, dh]``."""
        kf = self.project_key((self.kf_proj or self.k_proj)(f))
        vf = (self.vf_proj or self.v_proj)(f).unflatten(-1, (self.n_kv_heads, self.head_dim))
        return apply_rope(kf, cos, sin), vf

    def eidetic_query(self, q: Tensor, q_rot: Tensor) -> Tensor:
        """The query that scores eidetic keys (DESIGN.md §3): unrotated for ``"none"``, rotated
        for ``"absolute"``; for ``"window_edge"``, ``<R(i) q, R(i-W-F) k> = <R(W+F) q, k>``."""
        if self.eidetic_rope == "none":
            return q
        if self.eidetic_rope == "absolute":
            return q_rot
        cos, sin = self.rope(torch.full((1,), self.window + self.fading_span, device=q.device))  # no host copy
        return apply_rope(q, cos, sin)

    def eidetic_key(self, k: Tensor, k_rot: Tensor) -> Tensor:
        """What a memory slot stores as key: rotated only for ``"absolute"``."""
        return k_rot if self.eidetic_rope == "absolute" else k

    def _innovation(self, x: Tensor, f_prev: Tensor) -> Tensor:
        """``s_t`` from ``x_t`` and ``f_{t-1}``, in float32 whatever the weights' dtype and
        autocast, so prefill and decoding rank tokens alike. Gradients reach only Φ: both
        inputs are detached (DESIGN.md §4)."""
        with torch.autocast(x.device.type, enabled=False):
            x_hat = f_prev.detach().float()
            for layer in self.predictor:
                x_hat = F.linear(x_hat, layer.weight.float())
            return innovation_scores(x.detach(), x_hat)

    def _selection_scores(self, x: Tensor, f_prev: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Selection score per position ``[B, L]`` and the auxiliary loss."""
        if self.selection == "topk":
            innovation = self._innovation(x, f_prev)
            return innovation.detach(), innovation.mean()
        zeros = x.new_zeros(x.shape[:-1], dtype=torch.float32)
        return selection_scores(zeros, positions, self.selection, self.selection_seed), zeros.sum()

    @torch.no_grad()
    def token_scores(self, x: Tensor) -> Tensor:
        """The selection score of every position of ``x [B, L, D]`` (innovation for
        ``"topk"``), as the parallel path ranks them: ``[B, L]``."""
        f = self.ssm(x)
        positions = torch.arange(x.shape[1], device=x.device)
        return self._selection_scores(x, F.pad(f, (0, 0, 1, 0))[:, : x.shape[1]], positions)[0]

    def forward(self, x: Tensor, cache: BMojoCache | None = None, start: int = 0) -> Tensor:
        return self.forward_with_aux(x, cache, start)[0]

    def _project_qkv(self, x: Tensor, cache: BMojoCache | None, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, L, D]`` at positions ``start ..`` -> ``q [B, L, H, dh]``, ``k, v [B, L, Hkv, dh]``
        (unrotated). With ``qkv_conv``, the convolution continues from the cache's last
        projections when ``start > 0`` (zeros before position 0), and the cache keeps the new last ones."""
        if self.qkv_conv is None:
            return self.project_qkv(x)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)  # [B, L, (H + 2 Hkv) dh]
        weight, bias = self.qkv_conv.weight, self.qkv_conv.bias
        if cache is None:
            qkv = causal_depthwise_conv1d(qkv, weight, bias)
        else:
            n_past = cache.qkv_conv_state.shape[1]  # K - 1
            past = cache.qkv_conv_state if start > 0 else torch.zeros_like(cache.qkv_conv_state)  # zeros before 0
            extended = torch.cat([past.to(qkv.dtype), qkv], 1)  # [B, K-1+L, (H + 2 Hkv) dh]
            cache.qkv_conv_state.copy_(extended[:, extended.shape[1] - n_past:].detach())
            qkv = causal_depthwise_conv1d(extended, weight, bias)[:, n_past:]
        q_dim, kv_dim = self.q_proj.out_features, self.k_proj.out_features
        return self.split_heads(*qkv.split([q_dim, kv_dim, kv_dim], -1))

    def _project(self, x: Tensor, start: int, cache: BMojoCache | None) -> tuple[Tensor, ...]:
        """``x [B, L, D]`` at positions ``start ..`` -> the SSM output ``f [B, L, D]``, the
        unrotated and rotated ``q [B, L, H, dh]`` and ``k [B, L, Hkv, dh]``, ``v``, and the
        fading tokens ``kf, vf`` (``None`` without fading span)."""
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        f = self.ssm(x, None if cache is None else cache.ssm, start)
        q, k, v = self._project_qkv(x, cache, start)
        cos, sin = self.rope(positions)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kf, vf = self.fading_kv(f, cos, sin) if self.fading_span > 0 else (None, None)
        return f, q, k, v, q_rot, k_rot, kf, vf

    def _output(self, out: Tensor, f: Tensor) -> Tensor:
        y = self.o_proj(out.flatten(-2))
        return y + f if self.ssm_residual else y

    def forward_with_aux(self, x: Tensor, cache: BMojoCache | None = None, start: int = 0) -> tuple[Tensor, Tensor]:
        """Parallel form. Returns ``(y [B, L, D], aux_loss)``. Without a cache, over positions
        ``0 .. L-1`` (training); with one, over positions ``start ..`` from the cache
        (:meth:`_forward_cached`: a prefill from ``start = 0``, a continued prefill after)."""
        if cache is not None:
            return self._forward_cached(x, cache, start)
        if start != 0:
            raise ValueError(f"start={start}: without a cache the parallel form starts at position 0")
        b, L, _ = x.shape
        W, Fs, C = self.window, self.fading_span, self.chunk_size
        f, q, k, v, q_rot, k_rot, kf, vf = self._project(x, 0, None)
        aux = x.new_zeros((), dtype=torch.float32)
        memory = {}
        nq = math.ceil(L / C)
        if self.has_memory or self.has_storage:
            k_eid, q_eid = self.eidetic_key(k, k_rot), self.eidetic_query(q, q_rot)  # as slots store / score them
        slots = []  # per query chunk: positions [B, nq, n] of the past tokens in the attention keys
        if self.has_memory:
            f_prev = F.pad(f, (0, 0, 1, 0))[:, :L]  # f_{t-1}, zeros at t = 0
            score, aux = self._selection_scores(x, f_prev, torch.arange(L, device=x.device))
            sel_pos, sel_score = select_per_chunk(score, C, self.eidetic_per_chunk, self.innovation_threshold)
            mem_pos, mem_score = eidetic_memory_per_chunk(sel_pos, sel_score, self.eidetic_capacity,
                                                          self.eidetic_policy)  # [B, L//C + 1, M]
            slots.append(mem_pos[:, :nq])  # memory seen by each query chunk
        if self.has_storage:
            if self.storage_source == "evicted":  # the stream of dropped entries, k per boundary
                stream = eidetic_dropped_per_chunk(sel_pos, sel_score, mem_pos, mem_score)[0].flatten(1)
                total = stream.shape[1] // self.storage_block_size
                block_pos = stream[:, : total * self.storage_block_size].view(b, total, -1)  # [B, m, S]
            else:
                block_pos = raw_block_positions(self.stored_blocks(L // C), self.storage_block_size,
                                                x.device).expand(b, -1, -1)  # [B, m, S]
            counts = [self.stored_blocks(n) for n in range(1, L // C + 1)]
            ret_block = retrieval_per_chunk(q_eid.detach(), k_eid.detach(), block_pos, counts, self.storage_blocks,
                                            C, self.storage_capacity(self.q_proj.weight.dtype),
                                            self.storage_overflow)[:, :nq]  # [B, nq, r]
            if self.has_memory:
                slots[0] = self._dedupe(slots[0], ret_block)
            slots.append(entry_positions(block_pos, ret_block))  # [B, nq, r*S]
        if slots:
            slot_pos = torch.cat(slots, -1)  # [B, nq, M + r*S]
            memory = dict(mem_k=gather_positions(k_eid, slot_pos), mem_v=gather_positions(v, slot_pos),
                          mem_pos=slot_pos, q_mem=q_eid)
        out = self.parallel_attention(q_rot, k_rot, v, W, Fs, kf, vf, chunk_size=C, **memory)
        return self._output(out, f), aux

    def _forward_cached(self, x: Tensor, cache: BMojoCache, start: int) -> tuple[Tensor, Tensor]:
        """The parallel form over positions ``P = start .. P+L-1`` continuing from ``cache``
        (empty when ``start = 0``), which is left as ``L`` decoding steps leave it; the outputs
        equal theirs (DESIGN.md §7, §8.3: chunked prefill).

        The attention runs over a sequence that starts at the chunk boundary ``O`` at or before
        ``P - W - F``: positions ``O .. P-1`` hold the cached raw and fading keys (with zero
        queries, whose rows are dropped), then the ``L`` new tokens. The eidetic memory
        continues from the cached slots and the open chunk's candidates; the store is written
        and read at every boundary in order, as decoding does. Gradients reach the new tokens
        only: what comes from the cache or the store is a constant.
        """
        b, L, _ = x.shape
        W, Fs, C = self.window, self.fading_span, self.chunk_size
        if start == 0:
            self._clear(cache)
        f, q, k, v, q_rot, k_rot, kf, vf = self._project(x, start, cache)
        aux = x.new_zeros((), dtype=torch.float32)
        slot_pos, slot_k, slot_v = [], [], []  # per new query chunk: [B, nq, n] positions, [B, nq, n, Hkv, dh]
        if self.has_memory or self.has_storage:
            k_eid, q_eid = self.eidetic_key(k, k_rot), self.eidetic_query(q, q_rot)
        dropped = None
        if self.has_memory:
            mem_pos, mem_k, mem_v, dropped, aux = self._memory_continued(cache, x, f, k_eid, v, start)
            slot_pos.append(mem_pos)
            slot_k.append(mem_k)
            slot_v.append(mem_v)
        if self.has_storage:
            ret_block, ret_pos, ret_k, ret_v = self._storage_continued(cache, q_eid, k_eid, v, start, dropped)
            if self.has_memory:
                slot_pos[0] = self._dedupe(slot_pos[0], ret_block)
            slot_pos.append(ret_pos)
            slot_k.append(ret_k.to(k.dtype))
            slot_v.append(ret_v.to(v.dtype))

        origin = max(0, start - W - Fs) // C * C
        n_past = start - origin
        past_k, past_v = cache.raw.read(origin, start)  # [B, n_past, Hkv, dh]

        def with_past(new: Tensor, past: Tensor | None = None) -> Tensor:  # [B, L, ...] -> [B, n_past + L, ...]
            return torch.cat([new.new_zeros(b, n_past, *new.shape[2:]) if past is None else past.to(new.dtype), new], 1)

        fading = {}
        if Fs > 0:
            past_kf, past_vf = cache.fading.read(origin, start)
            fading = dict(kf=with_past(kf, past_kf), vf=with_past(vf, past_vf))
        memory = {}
        if slot_pos:
            past_chunks = (start // C * C - origin) // C  # chunks of the past positions: no slot
            pos = F.pad(torch.cat(slot_pos, -1), (0, 0, past_chunks, 0), value=-1)  # [B, nq', n]
            # Relative to O; a slot older than O counts as O: visible to every new query (i - W >= O).
            pos = torch.where(pos >= 0, (pos - origin).clamp(min=0), -1)
            memory = dict(mem_pos=pos, q_mem=with_past(q_eid),
                          mem_k=F.pad(torch.cat(slot_k, 2), (0, 0, 0, 0, 0, 0, past_chunks, 0)),
                          mem_v=F.pad(torch.cat(slot_v, 2), (0, 0, 0, 0, 0, 0, past_chunks, 0)))
        out = self.parallel_attention(with_past(q_rot), with_past(k_rot, past_k), with_past(v, past_v), W, Fs,
                                      chunk_size=C, **fading, **memory)[:, n_past:]
        cache.raw.write(k_rot, v, start)
        if cache.fading is not None:
            cache.fading.write(kf, vf, start)
        cache.prev_f.copy_(f[:, -1].detach())
        return self._output(out, f), aux

    def _clear(self, cache: BMojoCache) -> None:
        """Empty ``cache`` for a prefill from position 0 (its store must be empty)."""
        if self.has_storage and cache.store.written:
            raise ValueError("a prefill needs an empty block store (this cache's store already holds blocks)")
        cache.raw.clear()
        if cache.fading is not None:
            cache.fading.clear()
        cache.prev_f.zero_()
        if self.has_memory:
            cache.mem_pos.fill_(-1)
            cache.mem_score.fill_(float("-inf"))
            cache.cand_score.fill_(float("-inf"))
        if self.has_storage:
            cache.pending.clear()
            if cache.pending_pos is not None:
                cache.pending_pos.fill_(-1)
            cache.ret_block.fill_(-1)
            cache.ret_pos.fill_(-1)

    def _memory_continued(self, cache: BMojoCache, x: Tensor, f: Tensor, k_eid: Tensor, v: Tensor, start: int
                          ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, Tensor]:
        """The eidetic memory each query chunk of positions ``start .. start+L-1`` sees, continued
        from the cached slots and the candidates of the open chunk (positions ``start//C·C ..
        start-1``): ``(pos [B, nq, M], k, v [B, nq, M, Hkv, dh], dropped, aux_loss)``, ``dropped``
        the entries each completed chunk's update drops (``pos [B, nc, k]``, ``k, v [B, nc, k,
        Hkv, dh]``) when the store takes them (``"evicted"``), else ``None``. Leaves in the
        cache the memory after the last complete chunk and the candidates of the chunk still open."""
        L, C, M = x.shape[1], self.chunk_size, self.eidetic_capacity
        chunk_start = start // C * C
        n_open = start - chunk_start
        f_prev = torch.cat([cache.prev_f[:, None].to(f.dtype), f[:, :-1]], 1)  # f_{t-1}
        score, aux = self._selection_scores(x, f_prev, torch.arange(start, start + L, device=x.device))  # [B, L]
        # The tokens of positions chunk_start .. start+L-1: the cached candidates, then the new ones.
        token_score = torch.cat([cache.cand_score[:, :n_open], score], 1)
        token_k = torch.cat([cache.cand_k[:, :n_open].to(k_eid.dtype), k_eid], 1)
        token_v = torch.cat([cache.cand_v[:, :n_open].to(v.dtype), v], 1)
        sel_pos, sel_score = select_per_chunk(token_score, C, self.eidetic_per_chunk, self.innovation_threshold)
        sel_pos = torch.where(sel_pos >= 0, sel_pos + chunk_start, -1)
        mem_pos, mem_score = eidetic_memory_per_chunk(sel_pos, sel_score, M, self.eidetic_policy,
                                                      initial=(cache.mem_pos, cache.mem_score))  # [B, nc+1, M]
        source_k = torch.cat([cache.mem_k.to(k_eid.dtype), token_k], 1)  # [B, M + n_open + L, Hkv, dh]
        source_v = torch.cat([cache.mem_v.to(v.dtype), token_v], 1)

        def entries(pos: Tensor) -> tuple[Tensor, Tensor]:
            """Keys and values of entries at ``pos``: a cached slot (positions before chunk_start)
            or one of the tokens above."""
            cached_slot = (pos[..., None] == cache.mem_pos[:, None, None, :]).int().argmax(-1)
            index = torch.where(pos >= chunk_start, M + pos - chunk_start, cached_slot)
            return gather_positions(source_k, index), gather_positions(source_v, index)

        mem_k, mem_v = entries(mem_pos)
        dropped = None
        if self.has_storage and self.storage_source == "evicted":
            drop_pos, _ = eidetic_dropped_per_chunk(sel_pos, sel_score, mem_pos, mem_score)  # [B, nc, k]
            dropped = (drop_pos, *entries(drop_pos))
        cache.mem_pos, cache.mem_score = mem_pos[:, -1].clone(), mem_score[:, -1].clone()
        cache.mem_k = mem_k[:, -1].detach().to(cache.cand_k.dtype)
        cache.mem_v = mem_v[:, -1].detach().to(cache.cand_v.dtype)
        n_tail = (start + L) % C  # tokens of the chunk still open
        cache.cand_score.fill_(float("-inf"))
        cache.cand_score[:, :n_tail] = token_score[:, token_score.shape[1] - n_tail:]
        cache.cand_k[:, :n_tail] = token_k[:, token_k.shape[1] - n_tail:].detach()
        cache.cand_v[:, :n_tail] = token_v[:, token_v.shape[1] - n_tail:].detach()
        nq = math.ceil((start + L) / C) - start // C
        return mem_pos[:, :nq], mem_k[:, :nq], mem_v[:, :nq], dropped, aux

    def _storage_continued(self, cache: BMojoCache, q_eid: Tensor, k_eid: Tensor, v: Tensor, start: int,
                           dropped: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The blocks each query chunk of positions ``start .. start+L-1`` retrieves,
        ``(ids [B, nq, r], pos [B, nq, r·S], k, v [B, nq, r·S, Hkv, dh])``: the cached retrieval
        for the open chunk, then the decoder's boundary work (the entries the chunk's memory
        update dropped, then :meth:`_storage_boundary`) at every boundary the tokens cross,
        writes and reads in order, so that a budget evicts as in decoding."""
        L, C = q_eid.shape[1], self.chunk_size
        dtype = cache.chunk_q.dtype
        found = [(cache.ret_block, cache.ret_pos, cache.ret_k.to(dtype), cache.ret_v.to(dtype))]
        t = start
        while t < start + L:
            end = min((t // C + 1) * C, start + L)  # the end of t's chunk, or of the tokens
            new = slice(t - start, end - start)
            if self.storage_source == "raw":
                cache.pending.write(k_eid[:, new], v[:, new], t)
            cache.chunk_q[:, t % C: t % C + end - t] = q_eid[:, new].detach().to(dtype)
            if end % C == 0:
                n = end // C
                if self.storage_source == "evicted":
                    chunk = n - 1 - start // C  # its index among the chunks the memory update saw
                    self._push_dropped(cache, n, *(t[:, chunk] for t in dropped))
                self._storage_boundary(cache, n)
                if end < start + L:  # the next chunk has queries here
                    found.append((cache.ret_block, cache.ret_pos, cache.ret_k.to(dtype), cache.ret_v.to(dtype)))
            t = end
        return tuple(torch.stack(parts, 1) for parts in zip(*found, strict=True))

    def _push_dropped(self, cache: BMojoCache, n: int, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """``"evicted"``: the ``k`` entries (``pos [B, k]``, ``k, v [B, k, Hkv, dh]``) the update at
        the boundary before chunk ``n`` dropped: indices ``(n-1)·k .. n·k - 1`` of the stream."""
        first = (n - 1) * self.eidetic_per_chunk
        cache.pending.write(k, v, first)
        slots = torch.arange(first, first + pos.shape[1], device=pos.device) % cache.pending_pos.shape[1]
        cache.pending_pos[:, slots] = pos

    def _storage_boundary(self, cache: BMojoCache, n: int) -> None:
        """At the boundary before query chunk ``n``: write the blocks that became complete,
        then retrieve the ``r`` best for chunk ``n`` with the queries of chunk ``n - 1``."""
        S, ring = self.storage_block_size, cache.pending
        for block in range(cache.store.written, self.stored_blocks(n)):
            index = torch.arange(block * S, (block + 1) * S, device=ring.pos.device)  # positions, or stream indices
            slots = index % ring.pos.shape[0]
            pos = cache.pending_pos[:, slots] if self.storage_source == "evicted" else index[None]
            cache.store.append(block, ring.k[:, slots], ring.v[:, slots], pos)
        cache.ret_block, cache.ret_k, cache.ret_v, cache.ret_pos = retrieve(cache.store, cache.chunk_q,
                                                                            self.storage_blocks)

    def step(self, x: Tensor, cache: BMojoCache, position: int) -> Tensor:
        """One token ``x [B, D]`` at absolute ``position`` -> ``[B, D]``, cost
        ``O(W + F + M + r·S)`` attention whatever the position, plus, once per chunk, scoring
        the store's block summaries (linear in the number of stored blocks)."""
        W = self.window
        t = position
        f = self.ssm.step(x, cache.ssm)  # [B, D]
        q, k, v = self._project_qkv(x[:, None], cache, t)  # [B, 1, ., dh]
        position_t = torch.arange(t, t + 1, device=x.device)  # [1]; made on the device: no host copy, no sync
        cos, sin = self.rope(position_t)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.raw.write(k_rot, v, t)
        keys, values, visible = [cache.raw.k], [cache.raw.v], [cache.raw.pos >= 0]
        if cache.fading is not None:
            kf, vf = self.fading_kv(f[:, None], cos, sin)
            cache.fading.write(kf, vf, t)
            fpos = cache.fading.pos  # its W + F slots hold positions >= t - W - F + 1 (or -1: empty)
            keys.append(cache.fading.k)
            values.append(cache.fading.v)
            visible.append((fpos >= 0) & (fpos <= t - W))
        memory = {}
        if self.has_memory or self.has_storage:
            q_eid, k_eid = self.eidetic_query(q, q_rot)[:, 0], self.eidetic_key(k, k_rot)  # [B, H, dh], [B, 1, Hkv, dh]
        slot_k, slot_v, slot_pos = [], [], []
        if self.has_memory:
            slot_k.append(cache.mem_k)
            slot_v.append(cache.mem_v)
            slot_pos.append(self._dedupe(cache.mem_pos, cache.ret_block) if self.has_storage else cache.mem_pos)
        if self.has_storage:
            slot_k.append(cache.ret_k)
            slot_v.append(cache.ret_v)
            slot_pos.append(cache.ret_pos)
        if slot_k:
            mem_pos = torch.cat(slot_pos, 1)  # [B, M + r*S]
            memory = dict(q_mem=q_eid, mem_k=torch.cat(slot_k, 1), mem_v=torch.cat(slot_v, 1),
                          mem_visible=(mem_pos >= 0) & (mem_pos <= t - W))
        out = union_attention_step(q_rot[:, 0], torch.cat(keys, 1), torch.cat(values, 1), torch.cat(visible),
                                   **memory)
        if self.has_memory:
            score, _ = self._selection_scores(x[:, None], cache.prev_f[:, None], position_t)
            self._add_candidate(cache, k_eid[:, 0].detach(), v[:, 0].detach(), score[:, 0], t)
        if self.has_storage:
            if self.storage_source == "raw":
                cache.pending.write(k_eid, v, t)
            cache.chunk_q[:, t % self.chunk_size] = q_eid.detach().to(cache.chunk_q.dtype)
            if (t + 1) % self.chunk_size == 0:
                self._storage_boundary(cache, (t + 1) // self.chunk_size)
        cache.prev_f.copy_(f.detach())
        y = self.o_proj(out.flatten(-2))
        return y + f if self.ssm_residual else y

    def _add_candidate(self, cache: BMojoCache, k_eid: Tensor, v: Tensor, score: Tensor, t: int) -> None:
        """Store token ``t`` as a candidate of its chunk; when the chunk completes, select its
        best ``k`` and update the memory with the same functions as the parallel path."""
        C = self.chunk_size
        slot = t % C
        cache.cand_k[:, slot] = k_eid.to(cache.cand_k.dtype)
        cache.cand_v[:, slot] = v.to(cache.cand_v.dtype)
        cache.cand_score[:, slot] = score
        if slot != C - 1:
            return
        chunk_start = t - C + 1
        sel_idx, sel_score = select_per_chunk(cache.cand_score, C, self.eidetic_per_chunk,
                                              self.innovation_threshold)  # [B, 1, k]
        sel_idx, sel_score = sel_idx[:, 0], sel_score[:, 0]
        sel_pos = torch.where(sel_idx >= 0, sel_idx + chunk_start, -1)
        idx = eidetic_memory_update(cache.mem_pos, cache.mem_score, sel_pos, sel_score, self.eidetic_policy)
        all_k = torch.cat([cache.mem_k, gather_positions(cache.cand_k, sel_idx)], 1)  # [B, M + k, Hkv, dh]
        all_v = torch.cat([cache.mem_v, gather_positions(cache.cand_v, sel_idx)], 1)
        all_pos = torch.cat([cache.mem_pos, sel_pos], 1)
        all_score = torch.cat([cache.mem_score, sel_score], 1)
        if self.has_storage and self.storage_source == "evicted":
            drop = eidetic_memory_dropped(all_pos, all_score, idx, self.eidetic_per_chunk)  # [B, k]
            self._push_dropped(cache, (t + 1) // C, all_pos.gather(1, drop), gather_positions(all_k, drop),
                               gather_positions(all_v, drop))
        cache.mem_k, cache.mem_v = gather_positions(all_k, idx), gather_positions(all_v, idx)
        cache.mem_pos, cache.mem_score = all_pos.gather(1, idx), all_score.gather(1, idx)
        cache.cand_score.fill_(float("-inf"))

    def new_cache(self, batch_size: int, max_seq_len: int = 0, device=None, dtype=None,
                  store: BlockStore | None = None) -> BMojoCache:
        """An empty cache; with storage, ``store`` (default: a new RAM store) is its block store."""
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        hkv, dh, C, M = self.n_kv_heads, self.head_dim, self.chunk_size, self.eidetic_capacity
        cache = BMojoCache(
            ssm=self.ssm.new_cache(batch_size, device, dtype),
            raw=KVBuffer.empty(batch_size, self.window, hkv, dh, False, device, dtype),
            fading=(KVBuffer.empty(batch_size, self.window + self.fading_span, hkv, dh, False, device, dtype)
                    if self.fading_span > 0 else None),
            prev_f=torch.zeros(batch_size, self.ssm.d_model, device=device, dtype=dtype),
        )
        if self.qkv_conv is not None:
            channels, width = self.qkv_conv.in_channels, self.qkv_conv.kernel_size[0]
            cache.qkv_conv_state = torch.zeros(batch_size, width - 1, channels, device=device, dtype=dtype)
        if self.has_memory:
            cache.mem_pos, cache.mem_score = empty_memory(batch_size, M, device)
            cache.mem_k = torch.zeros(batch_size, M, hkv, dh, device=device, dtype=dtype)
            cache.mem_v = torch.zeros(batch_size, M, hkv, dh, device=device, dtype=dtype)
            cache.cand_k = torch.zeros(batch_size, C, hkv, dh, device=device, dtype=dtype)
            cache.cand_v = torch.zeros(batch_size, C, hkv, dh, device=device, dtype=dtype)
            cache.cand_score = torch.full((batch_size, C), float("-inf"), device=device)
        if self.has_storage:
            r, S = self.storage_blocks, self.storage_block_size
            cache.store = store if store is not None else self.new_store(batch_size, dtype)
            if self.storage_source == "evicted":
                pending = S + self.eidetic_per_chunk
                cache.pending_pos = torch.full((batch_size, pending), -1, dtype=torch.long, device=device)
            else:
                pending = self.window + self.fading_span + S + C
            cache.pending = KVBuffer.empty(batch_size, pending, hkv, dh, False, device, dtype)
            cache.chunk_q = torch.zeros(batch_size, C, self.n_heads, dh, device=device, dtype=dtype)
            cache.ret_block = torch.full((batch_size, r), -1, dtype=torch.long, device=device)
            cache.ret_pos = torch.full((batch_size, r * S), -1, dtype=torch.long, device=device)
            cache.ret_k = torch.zeros(batch_size, r * S, hkv, dh, device=device, dtype=dtype)
            cache.ret_v = torch.zeros(batch_size, r * S, hkv, dh, device=device, dtype=dtype)
        elif store is not None:
            raise ValueError("a block store was given to a layer without storage (storage_blocks=0)")
        return cache
