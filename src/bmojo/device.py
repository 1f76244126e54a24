"""The device every command runs on when none is given: CUDA when available, else the CPU."""

from __future__ import annotations

import torch


def device_or_default(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
