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
    ``target_params`` (widths that keep heads and SSM heads whole, up to 4x the base width; the
    narrower on a tie).

    Every weight grows with the width, so the count rises with it and a bisection over the valid
    widths finds the closest in a few meta-device builds (a 12-layer model at every width took
    about a minute)."""
    step = base["n_heads"] * 2
    configs = []  # the valid widths, narrowest first
    for d_model in range(step, 4 * base["d_model"] + 1, step):
        try:
            configs.append(ModelConfig.preset(arch, **{**base, "d_model": d_model}, vocab_size=vocab_size))
        except ValueError:
            continue
    if not configs:
        return base
    lo, hi = 0, len(configs) - 1  # bisect for the narrowest width with at least target_params
    while lo < hi:
        mid = (lo + hi) // 2
        if param_count(configs[mid]) >= target_params:
            hi = mid
        else:
            lo = mid + 1
    candidates = configs[max(lo - 1, 0):lo + 1]
    best = min(candidates, key=lambda config: abs(param_count(config) - target_params))
    return {**base, "d_model": best.d_model}
