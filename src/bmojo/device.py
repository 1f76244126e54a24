"""The device every command runs on when none is given: CUDA when available, else the CPU; and
whether a model's Triton kernels can run on a device."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from bmojo.ops.triton_support import require_triton

if TYPE_CHECKING:
    from bmojo.config import ModelConfig

KERNEL_FIELDS = ("attention_kernel", "ssd_kernel")
KERNEL_MODULES = ("bmojo.ops.attention_triton", "bmojo.ops.ssd_triton")


def device_or_default(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def triton_unavailable(device: str | torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or ``None`` when they can: on CUDA, or on the CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``, as in the tests)."""
    try:
        triton = require_triton("the Triton kernels")
    except ImportError as err:
        return str(err)
    if torch.device(device).type != "cuda" and not _interpreted(triton):
        return f"the Triton kernels run on CUDA, this run's device is {torch.device(device)}"
    return None


def _interpreted(triton: ModuleType) -> bool:
    """Whether the kernels run in Triton's CPU interpreter: each kernel module already imported
    as it decided at its import (Triton reads its setting when it defines a kernel), the others
    as the setting is now (they read it when they are imported); all of them, or not at all."""
    return all(triton.knobs.runtime.interpret if module is None else module.INTERPRETED
               for module in map(sys.modules.get, KERNEL_MODULES))


def require_kernels_run_on(config: ModelConfig, device: str | torch.device) -> None:
    """``ValueError`` (one line) when ``config`` chooses Triton kernels (``attention_kernel`` or
    ``ssd_kernel``) that cannot run on ``device``: before training starts, not at its first step."""
    chosen = [f"{field}='triton'" for field in KERNEL_FIELDS if getattr(config, field) == "triton"]
    reason = triton_unavailable(device) if chosen else None
    if reason:
        raise ValueError(f"{' and '.join(chosen)}: {reason}")
