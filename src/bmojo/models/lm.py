"""`LanguageModel`: a stack of pre-norm residual blocks whose mixers follow a layer pattern
(DESIGN.md §6), with a fixed-size decoding cache (§7) and safetensors checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from bmojo.config import ModelConfig
from bmojo.layers.attention import Attention
from bmojo.layers.bmojo import BMojoMixer
from bmojo.layers.mamba2 import Mamba2Mixer
from bmojo.layers.mlp import SwiGLU
from bmojo.layers.norm import RMSNorm
from bmojo.models.cache import ModelCache
from bmojo.models.sampling import stream_generate
from bmojo.ops.storage import store_file_name

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RESIDUAL_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "out_proj.weight")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass
class ModelOutput:
    logits: Tensor  # [B, L, V]
    aux_loss: Tensor  # scalar: sum of the layers' innovation-predictor losses (0 when unused)
    cache: ModelCache | None


def build_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    """The mixer of one layer letter (DESIGN.md §6)."""
    if kind in "AW":
        return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, window=cfg.window if kind == "W" else None,
                         qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                         attention_kernel=cfg.attention_kernel)
    if kind == "S":
        return Mamba2Mixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                           headdim=cfg.ssm_headdim, ngroups=cfg.ssm_ngroups, ssd_kernel=cfg.ssd_kernel)
    capacity = cfg.eidetic_capacity if kind == "B" else 0
    return BMojoMixer(
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, window=cfg.window, fading_span=cfg.fading_span,
        chunk_size=cfg.chunk_size, eidetic_per_chunk=cfg.eidetic_per_chunk, eidetic_capacity=capacity,
        eidetic_policy=cfg.eidetic_policy, selection=cfg.selection,
        innovation_threshold=cfg.innovation_threshold, eidetic_rope=cfg.eidetic_rope,
        selection_seed=cfg.selection_seed, innovation_rank=cfg.innovation_rank, ssm_residual=cfg.ssm_residual,
        tie_fading_proj=cfg.tie_fading_proj, qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
        ssm_headdim=cfg.ssm_headdim, ssm_ngroups=cfg.ssm_ngroups,
        storage_blocks=cfg.storage_blocks if kind == "B" else 0, storage_block_size=cfg.storage_block_size,
        storage_budget_bytes=cfg.storage_budget_bytes, storage_overflow=cfg.storage_overflow,
        storage_source=cfg.storage_source, qkv_conv=cfg.qkv_conv, attention_kernel=cfg.attention_kernel,
        ssd_kernel=cfg.ssd_kernel,
    )


class Block(nn.Module):
    """``h += mixer(norm(h)); h += mlp(norm(h))`` (the MLP is absent when ``mlp_ratio = 0``)."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.mlp_ratio > 0 else None
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden) if cfg.mlp_ratio > 0 else None

    def _mlp(self, h: Tensor) -> Tensor:
        return h if self.mlp is None else h + self.mlp(self.mlp_norm(h))

    def forward(self, h: Tensor, cache=None, start: int = 0) -> tuple[Tensor, Tensor | None]:
        x = self.mixer_norm(h)
        if isinstance(self.mixer, BMojoMixer):
            y, aux = self.mixer.forward_with_aux(x, cache, start)
        else:
            y, aux = self.mixer(x, cache, start), None
        return self._mlp(h + y), aux

    def step(self, h: Tensor, cache, position: int) -> Tensor:
        x = self.mixer_norm(h)
        y = self.mixer.step(x, cache) if self.kind == "S" else self.mixer.step(x, cache, position)
        return self._mlp(h + y)

    def new_cache(self, batch_size: int, max_seq_len: int, device, dtype, store=None):
        if self.kind == "S":
            return self.mixer.new_cache(batch_size, device, dtype)
        if store is not None:
            return self.mixer.new_cache(batch_size, max_seq_len, device, dtype, store=store)
        return self.mixer.new_cache(batch_size, max_seq_len, device, dtype)

    @property
    def has_storage(self) -> bool:
        return isinstance(self.mixer, BMojoMixer) and self.mixer.has_storage


class LanguageModel(nn.Module):
    """Token ids ``[B, L]`` -> :class:`ModelOutput`. Every architecture of DESIGN.md §6."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(kind, config) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-style: N(0, init_std) for linears and embeddings, residual output projections
        scaled by 1/sqrt(2 n_layers); Mamba-2's ``dt_bias``, ``A_log``, ``D`` and conv, and B'MOJO's
        ``qkv_conv``, keep their own initialisation; the innovation predictor starts at zero (x̂ = 0)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_OUTPUT_PROJECTIONS):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.n_layers))
            if ".predictor." in name:
                nn.init.zeros_(param)

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype == torch.bool or tokens.is_complex():
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [batch, length], got {shape}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one position")
        if torch.compiler.is_compiling():  # reading the values back would break the graph: assert in it
            in_range = ((tokens >= 0) & (tokens < self.config.vocab_size)).all()
            torch._assert_async(in_range, f"token ids must be in [0, {self.config.vocab_size})")
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got values in [{low}, {high}]")

    def forward(self, tokens: Tensor, cache: ModelCache | None = None) -> ModelOutput:
        """Logits for ``tokens [B, L]``. With a ``cache`` the sequence continues from the
        cache's position and the cache is updated in place, exactly as decoding the tokens one
        by one would (DESIGN.md §7, §8.3): the parallel path fills a fresh cache (prefill) or
        continues a used one (chunked prefill: a long prompt can be fed in pieces of any
        length); a single token after position 0 is one decoding step (:meth:`step`)."""
        self._check_tokens(tokens)
        if cache is not None and cache.batch_size != tokens.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} sequences, tokens hold {tokens.shape[0]}")
        start = cache.position if cache is not None else 0
        if start > 0 and tokens.shape[1] == 1:
            logits = self.step(tokens[:, 0], cache)[:, None]
            return ModelOutput(logits, logits.new_zeros((), dtype=torch.float32), cache)
        h = self.embed(tokens)
        aux = h.new_zeros((), dtype=torch.float32)
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            h, layer_aux = block(h, layer_cache, start)
            if layer_aux is not None:
                aux = aux + layer_aux
        if cache is not None:
            cache.position = start + tokens.shape[1]
        return ModelOutput(self.lm_head(self.norm(h)), aux, cache)

    def step(self, token: Tensor, cache: ModelCache) -> Tensor:
        """Decode one token per sequence, ``token [B]`` -> logits ``[B, V]``."""
        h = self.embed(token)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            h = block.step(h, layer_cache, cache.position)
        cache.position += 1
        return self.lm_head(self.norm(h))

    def new_cache(self, batch_size: int, device=None, dtype=None, max_seq_len: int | None = None,
                  storage_dir: str | Path | None = None) -> ModelCache:
        """An empty decoding cache. Fixed size, except full-attention layers, whose KV buffer
        starts at ``max_seq_len`` (default ``config.max_seq_len``) and doubles when full.

        With storage (``storage_blocks > 0``) each B'MOJO layer also gets a block store
        (DESIGN.md §5): in host RAM, or with ``storage_dir`` one memory-mapped file per layer
        in that directory (existing store files there are overwritten)."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        max_seq_len = max_seq_len or self.config.max_seq_len
        if storage_dir is not None and not any(block.has_storage for block in self.blocks):
            raise ValueError("storage_dir is given but no layer has storage: set storage_blocks > 0")
        layers = []
        for index, block in enumerate(self.blocks):
            store = None
            if storage_dir is not None and block.has_storage:
                store = block.mixer.new_store(batch_size, dtype, Path(storage_dir) / store_file_name(index))
            layers.append(block.new_cache(batch_size, max_seq_len, device, dtype, store))
        return ModelCache(layers=layers, batch_size=batch_size, dtype=dtype)

    def load_cache(self, path: str | Path, storage_dir: str | Path | None = None, device=None) -> ModelCache:
        """A cache written by :meth:`ModelCache.save`, with its layers' block stores reopened
        from ``storage_dir`` (checked: header, length, checksums, and the number of blocks the
        cache's position implies), so that decoding continues exactly where it stopped."""
        device = device if device is not None else self.embed.weight.device
        state = torch.load(path, map_location=device, weights_only=True)
        dtype = getattr(torch, state["dtype"])
        cache = self.new_cache(state["batch_size"], device=device, dtype=dtype)
        cache.load_state(state)
        for index, (block, layer) in enumerate(zip(self.blocks, cache.layers, strict=True)):
            if not block.has_storage:
                continue
            if storage_dir is None:
                raise ValueError(f"{path}: this model has storage; pass the storage_dir its decode wrote to")
            store = block.mixer.open_store(cache.batch_size, dtype, Path(storage_dir) / store_file_name(index))
            expected = block.mixer.stored_blocks(cache.position // block.mixer.chunk_size)
            if store.written != expected:
                raise ValueError(f"block store {store.path} holds {store.written} blocks, the cache at position "
                                 f"{cache.position} expects {expected}: store and cache come from different decodes")
            layer.store = store
        return cache

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Prefill ``tokens [B, L]`` once, then decode ``max_new_tokens`` through the cache.
        Returns ``[B, L + max_new_tokens]``."""
        new_tokens = stream_generate(self, tokens, max_new_tokens, temperature, top_k, top_p, seed)
        tokens = tokens.to(self.embed.weight.device)
        return torch.cat([tokens, *(t[:, None] for t in new_tokens)], dim=1)

    def state_size_bytes(self) -> int:
        """Bytes a decoder keeps per sequence (KV buffers, SSM states, eidetic slots and chunk
        candidates), at ``config.max_seq_len`` context for full-attention layers."""
        return self.new_cache(1, device="meta").nbytes()

    def num_params(self) -> int:
        """Number of parameters, tied embeddings counted once."""
        return sum(p.numel() for p in self.parameters())

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices; none on norms, biases and the parameters marked
        ``_no_weight_decay`` (Mamba-2's ``A_log``, ``D``, ``dt_bias``)."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.dim() < 2 or getattr(param, "_no_weight_decay", False):
                no_decay.append(param)
            else:
                decay.append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (shared tensors stored once)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(self.config.to_json())
        save_model(self, str(directory / WEIGHTS_FILE))

    @staticmethod
    def saved_config(directory: str | Path, *, attention_kernel: str | None = None,
                     ssd_kernel: str | None = None) -> ModelConfig:
        """The config of a checkpoint written by :meth:`save_pretrained`, with the kernels of
        :meth:`from_pretrained` (``None``: as saved), without building the model."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a bmojo checkpoint: {name} is missing")
        try:
            config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{directory / CONFIG_FILE} is not a valid bmojo config: {err}") from err
        kernels = {"attention_kernel": attention_kernel, "ssd_kernel": ssd_kernel}
        return replace(config, **{field: kernel for field, kernel in kernels.items() if kernel is not None})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", *,
                        attention_kernel: str | None = None, ssd_kernel: str | None = None) -> LanguageModel:
        """Rebuild a model saved by :meth:`save_pretrained`: weights bit-identical, in the dtype
        they were saved in. ``attention_kernel``, ``ssd_kernel``: the implementations to compute
        with (same results; ``None``: as saved), e.g. ``"torch"`` on a machine without the Triton
        kernels the model was trained with."""
        directory = Path(directory)
        config = cls.saved_config(directory, attention_kernel=attention_kernel, ssd_kernel=ssd_kernel)
        weights = str(directory / WEIGHTS_FILE)
        try:
            with safe_open(weights, framework="pt") as f:
                dtype = f.get_slice("embed.weight").get_dtype()
            model = cls(config).to(device=device, dtype=_SAFETENSORS_DTYPES.get(dtype, torch.float32))
            load_model(model, weights, strict=True, device=str(device))
        except (RuntimeError, SafetensorError) as err:
            raise ValueError(f"{weights} does not match {directory / CONFIG_FILE} or is corrupt: {err}") from err
        return model
