"""Pure tensor functions: each fast path next to its reference (DESIGN.md §3–§4, §8.2)."""

from bmojo.ops.attention import (
    attention_continued,
    union_attention_chunked,
    union_attention_reference,
    union_attention_step,
)
from bmojo.ops.eidetic import (
    eidetic_dropped_per_chunk,
    eidetic_memory_dropped,
    eidetic_memory_per_chunk,
    eidetic_memory_sequential,
    eidetic_memory_update,
    innovation_scores,
    rank_order,
    select_per_chunk,
    selection_scores,
    top_ranked,
)
from bmojo.ops.rope import apply_rope, rope_angles
from bmojo.ops.ssd import ssd_chunked, ssd_sequential, ssd_step

__all__ = [
    "apply_rope",
    "attention_continued",
    "eidetic_dropped_per_chunk",
    "eidetic_memory_dropped",
    "eidetic_memory_per_chunk",
    "eidetic_memory_sequential",
    "eidetic_memory_update",
    "innovation_scores",
    "rank_order",
    "rope_angles",
    "select_per_chunk",
    "selection_scores",
    "ssd_chunked",
    "ssd_sequential",
    "ssd_step",
    "top_ranked",
    "union_attention_chunked",
    "union_attention_reference",
    "union_attention_step",
]
