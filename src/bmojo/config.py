"""`ModelConfig`: every knob of DESIGN.md in one dataclass, and the presets of §6."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from bmojo.layers.bmojo import EIDETIC_ROPE_MODES
from bmojo.ops.attention import ATTENTION_KERNELS
from bmojo.ops.eidetic import POLICIES, SELECTIONS
from bmojo.ops.ssd import SSD_KERNELS
from bmojo.ops.storage import OVERFLOW_POLICIES, STORAGE_SOURCES
from bmojo.serialization import from_dict_strict

# DESIGN.md §6: the mixer of each layer, by letter.
LAYER_KINDS = {
    "A": "full causal attention",
    "W": "sliding-window attention",
    "S": "Mamba-2",
    "F": "B'MOJO-F (fading tokens, no eidetic memory)",
    "B": "B'MOJO (fading tokens and eidetic memory)",
}

PRESETS = {
    "transformer": "A",
    "swa": "W",
    "mamba2": "S",
    "hybrid": "SW",  # Samba style: Mamba-2 and sliding-window attention interleaved
    "bmojo-f": "F",
    "bmojo": "B",
}

# The Hugging Face bookkeeping of a checkpoint's config.json (bmojo.hf). `ModelConfig.to_json` writes the model type
# and architecture, so that every checkpoint directory is also a transformers model directory; transformers adds its
# version and the weights' dtype when it saves one. None of them is a model field.
HF_MODEL_TYPE = "bmojo"
HF_ARCHITECTURE = "BMojoForCausalLM"
HF_CONFIG_KEYS = frozenset({"model_type", "architectures", "transformers_version", "dtype"})


@dataclass
class ModelConfig:
    """Configuration of a :class:`bmojo.LanguageModel`.

    ``n_kv_heads``, ``fading_span`` and ``chunk_size`` default to ``n_heads``, ``window`` and
    ``window`` (DESIGN.md §2); ``layer_pattern`` defaults to the preset's. Fields a layer
    pattern does not use (e.g. ``window`` for ``"A"``) are ignored and not validated.
    """

    arch: str = "bmojo"
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    # attention (A, W, F, B layers)
    n_heads: int = 4
    n_kv_heads: int | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    window: int = 64
    # B'MOJO (F, B layers)
    fading_span: int | None = None
    chunk_size: int | None = None
    eidetic_per_chunk: int = 4
    eidetic_capacity: int = 64
    eidetic_policy: str = "score"
    selection: str = "topk"
    innovation_threshold: float | None = None
    eidetic_rope: str = "none"
    selection_seed: int = 0
    innovation_rank: int = 0  # 0: full-rank predictor Φ
    ssm_residual: bool = True
    tie_fading_proj: bool = True
    qkv_conv: int = 0  # K: causal depthwise convolution of width K over q, k, v (F, B layers); 0: none
    # long-term eidetic memory in storage (B layers, DESIGN.md §5): off while storage_blocks = 0
    storage_blocks: int = 0  # r: blocks each chunk retrieves
    storage_block_size: int | None = None  # S: tokens per stored block (default chunk_size)
    storage_budget_bytes: int = 0  # per layer and sequence; 0: no budget
    storage_overflow: str = "error"  # at the budget: "error" raises, "evict" drops the oldest block
    storage_source: str = "raw"  # what is stored: "raw" tokens older than the window, or "evicted" memory entries
    # Mamba-2 (S, F, B layers)
    d_state: int = 64
    ssm_headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    ssm_ngroups: int = 1
    # blocks
    mlp_ratio: float = 4.0  # SwiGLU hidden size = mlp_ratio * d_model, rounded up to 8; 0: no MLP
    layer_pattern: str | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    max_seq_len: int = 2048  # initial KV capacity of full-attention layers; their state-size context
    # the parallel forms of the windowed attention (W, F, B layers) and of the SSD scan (S, F, B):
    # PyTorch ops, or Triton kernels on CUDA
    attention_kernel: str = "torch"
    ssd_kernel: str = "torch"

    def __post_init__(self) -> None:
        if self.arch not in PRESETS:
            raise ValueError(f"arch={self.arch!r}: unknown preset; choose one of {list(PRESETS)}")
        if self.layer_pattern is None:
            self.layer_pattern = PRESETS[self.arch]
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.fading_span is None:
            self.fading_span = self.window
        if self.chunk_size is None:
            self.chunk_size = self.window
        if self.storage_block_size is None:
            self.storage_block_size = self.chunk_size
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The architecture ``name`` of DESIGN.md §6 with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        if "arch" in overrides:
            raise ValueError("pass the architecture as the preset name, not as arch=")
        return cls(arch=name, **overrides)

    @property
    def layer_kinds(self) -> list[str]:
        """The mixer letter of each layer: ``layer_pattern`` repeated to ``n_layers``."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]

    @property
    def mlp_hidden(self) -> int:
        return 8 * -(-int(round(self.mlp_ratio * self.d_model)) // 8)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is allowed."""

        def require(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r} is invalid: {allowed}")

        def positive_int(field: str) -> None:
            value = getattr(self, field)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
                    "must be an integer >= 1")

        for field in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            positive_int(field)
        require(isinstance(self.layer_pattern, str) and len(self.layer_pattern) > 0
                and all(c in LAYER_KINDS for c in self.layer_pattern), "layer_pattern",
                f"must be a non-empty string of layer letters {LAYER_KINDS}")
        def number(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        require(number(self.mlp_ratio) and self.mlp_ratio >= 0, "mlp_ratio",
                "must be a number >= 0 (0 removes the MLP)")
        require(self.norm_eps > 0, "norm_eps", "must be > 0")
        require(self.attention_kernel in ATTENTION_KERNELS, "attention_kernel", f"must be one of {ATTENTION_KERNELS}")
        require(self.ssd_kernel in SSD_KERNELS, "ssd_kernel", f"must be one of {SSD_KERNELS}")
        kinds = set(self.layer_pattern)
        if kinds & set("AWFB"):
            positive_int("n_heads")
            positive_int("n_kv_heads")
            require(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
            require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
            require((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                    f"must leave an even head dim for RoPE (d_model={self.d_model})")
            require(self.rope_theta > 0, "rope_theta", "must be > 0")
        if kinds & set("WFB"):
            positive_int("window")
        if kinds & set("FB"):
            require(isinstance(self.fading_span, int) and self.fading_span >= 0, "fading_span",
                    "must be an integer >= 0")
            positive_int("chunk_size")
            require(isinstance(self.qkv_conv, int) and not isinstance(self.qkv_conv, bool) and self.qkv_conv >= 0,
                    "qkv_conv", "must be an integer >= 0 (0: no convolution)")
        if "B" in kinds:
            positive_int("eidetic_per_chunk")
            require(self.eidetic_per_chunk <= self.chunk_size, "eidetic_per_chunk",
                    f"must be <= chunk_size={self.chunk_size}")
            require(isinstance(self.eidetic_capacity, int) and self.eidetic_capacity >= 0
                    and self.eidetic_capacity % self.eidetic_per_chunk == 0, "eidetic_capacity",
                    f"must be a non-negative multiple of eidetic_per_chunk={self.eidetic_per_chunk}")
            require(self.eidetic_policy in POLICIES, "eidetic_policy", f"must be one of {POLICIES}")
            require(self.selection in SELECTIONS, "selection", f"must be one of {SELECTIONS}")
            require(self.eidetic_rope in EIDETIC_ROPE_MODES, "eidetic_rope",
                    f"must be one of {EIDETIC_ROPE_MODES}")
            require(self.innovation_threshold is None or number(self.innovation_threshold), "innovation_threshold",
                    "must be a number or None")
            require(isinstance(self.innovation_rank, int) and self.innovation_rank >= 0, "innovation_rank",
                    "must be an integer >= 0 (0: full rank)")
            for field in ("storage_blocks", "storage_budget_bytes"):
                value = getattr(self, field)
                require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field,
                        "must be an integer >= 0 (0: off)")
            positive_int("storage_block_size")
            require(self.storage_overflow in OVERFLOW_POLICIES, "storage_overflow",
                    f"must be one of {OVERFLOW_POLICIES}")
            require(self.storage_source in STORAGE_SOURCES, "storage_source", f"must be one of {STORAGE_SOURCES}")
            require(self.storage_source == "raw" or self.storage_blocks == 0 or self.eidetic_capacity > 0,
                    "storage_source", "must be 'raw' without eidetic memory (eidetic_capacity=0): nothing is evicted")
        if kinds & set("SFB"):
            for field in ("d_state", "ssm_headdim", "expand", "d_conv", "ssm_ngroups"):
                positive_int(field)
            d_inner = self.expand * self.d_model
            require(d_inner % self.ssm_headdim == 0, "ssm_headdim",
                    f"must divide expand * d_model = {d_inner}")
            require((d_inner // self.ssm_headdim) % self.ssm_ngroups == 0, "ssm_ngroups",
                    f"must divide the number of SSM heads {d_inner // max(self.ssm_headdim, 1)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict_strict(cls, data)

    def to_json(self) -> str:
        """The ``config.json`` of a checkpoint: the model fields plus the Hugging Face model type and
        architecture (:data:`HF_CONFIG_KEYS`)."""
        return json.dumps({**self.to_dict(), "model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE]},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Read a ``config.json`` written by :meth:`to_json` or by transformers (``bmojo.hf``), or one without
        Hugging Face keys (older checkpoints). Unknown model fields are refused, as in :meth:`from_dict`."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"a config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", HF_MODEL_TYPE)
        if model_type != HF_MODEL_TYPE:
            raise ValueError(f"model_type={model_type!r}: not a bmojo config (expected {HF_MODEL_TYPE!r})")
        return cls.from_dict({key: value for key, value in data.items() if key not in HF_CONFIG_KEYS})


# Base shapes per size, for B'MOJO; the other architectures get the width that matches its
# parameter count (bmojo.models.sizing). "laptop" trains on a CPU; the others are for GPUs.
LM_SIZES: dict[str, dict[str, Any]] = {
    "laptop": {"d_model": 256, "n_layers": 4, "n_heads": 4, "window": 64, "fading_span": 64, "chunk_size": 64,
               "eidetic_per_chunk": 4, "eidetic_capacity": 64, "d_state": 16, "ssm_headdim": 32, "mlp_ratio": 4.0},
    "125m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "window": 512, "fading_span": 512, "chunk_size": 64,
             "eidetic_per_chunk": 4, "eidetic_capacity": 256, "d_state": 64, "ssm_headdim": 64, "mlp_ratio": 4.0},
    "350m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "window": 512, "fading_span": 512, "chunk_size": 64,
             "eidetic_per_chunk": 4, "eidetic_capacity": 256, "d_state": 64, "ssm_headdim": 64, "mlp_ratio": 4.0},
}
