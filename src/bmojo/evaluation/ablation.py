"""Test-time ablations: a trained model rebuilt with other settings that need no new weights
(eidetic capacity, selection, memory policy, window, ...), to measure what a setting
contributes to the model as trained (DESIGN.md §4: the memory itself has no parameters)."""

from __future__ import annotations

import dataclasses
from typing import Any

from bmojo.models.lm import LanguageModel


def with_settings(model: LanguageModel, **fields: Any) -> LanguageModel:
    """A copy of ``model`` built with ``fields`` replaced in its config and its trained weights.

    Weights the new settings no longer use (the innovation predictor, under ``selection="random"``
    or ``eidetic_capacity=0``) are dropped; a setting that would need weights the model does not
    have, or of other shapes, is a ``ValueError``."""
    config = dataclasses.replace(model.config, **fields)
    ablated = LanguageModel(config).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    trained = model.state_dict()
    wanted = ablated.state_dict()
    missing = sorted(set(wanted) - set(trained))
    reshaped = sorted(k for k in set(wanted) & set(trained) if wanted[k].shape != trained[k].shape)
    if missing or reshaped:
        raise ValueError(f"{fields} needs weights the trained model does not have: {missing + reshaped}")
    ablated.load_state_dict({k: trained[k] for k in wanted})
    return ablated.eval()
