"""``torch.compile`` for the training step: the whole model, inductor, static shapes
(docs/performance.md, "the whole model under torch.compile")."""

from __future__ import annotations

import torch
from torch import nn


def require_cxx_compiler(option: str) -> None:
    """``ValueError`` (one line, naming the user's ``option``) when inductor finds no C++ compiler,
    which it needs to build CPU kernels; checked through inductor's own lookup where this PyTorch
    has it (an older inductor reports a missing compiler at its first compile itself)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        raise ValueError(f"{option}: torch.compile on CPU needs a C++ compiler (g++ or clang++; set CXX), "
                         f"none was found") from err


def compile_static(module: nn.Module, device: torch.device, option: str) -> nn.Module:
    """``module`` under ``torch.compile(dynamic=False)``, the weights shared with ``module``.

    It compiles on its first call and again at each new input shape, autocast state or
    train/eval mode; past dynamo's recompilation limit (8 per function) further variants run
    eagerly, with dynamo's warning. On CPU, :func:`require_cxx_compiler` first."""
    if device.type == "cpu":
        require_cxx_compiler(option)
    return torch.compile(module, dynamic=False)
