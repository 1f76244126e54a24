"""Model sizes: parameter counts without allocating weights, and widths matched to a target
count, so that architectures are compared at (close to) equal parameters."""

from __future__ import annotations

from typing import Any

import torch

from bmojo.config import ModelConfig
from bmojo.models.lm import LanguageModel


def param_count(config: ModelConfig) -> int:
    """Parameters of ``LanguageModel(config)`` (tied embeddings once), built on the meta device."""
    with torch.device("meta"):
        return LanguageModel(config).num_params()


def matched_model(arch: str, base: dict[str, Any], target_params: int, vocab_size: int) -> dict[str, Any]:
    """``base`` with the width of ``arch`` chosen so its parameter count is closest to
    ``target_params`` (widths that keep heads and SSM heads whole, up to 4x the base width)."""
    best, best_gap = base, None
    step = base["n_heads"] * 2
    for d_model in range(step, 4 * base["d_model"] + 1, step):
        candidate = {**base, "d_model": d_model}
        try:
            config = ModelConfig.preset(arch, **candidate, vocab_size=vocab_size)
        except ValueError:
            continue
        gap = abs(param_count(config) - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = candidate, gap
    return best
