"""``torch.compile`` for the training step: the whole model, inductor, static shapes
(docs/performance.md, "the whole model under torch.compile")."""

from __future__ import annotations

import torch
from torch import nn


def compile_static(module: nn.Module, device: torch.device, option: str) -> nn.Module:
    """``module`` under ``torch.compile(dynamic=False)``: compiled on its first call at each new
    input shape, the weights shared with ``module``. ``ValueError`` (one line, naming the user's
    ``option``) where inductor cannot build kernels: on CPU it needs a C++ compiler."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as err:
            raise ValueError(f"{option}: torch.compile on CPU needs a C++ compiler (g++ or clang++; set CXX), "
                             f"none was found") from err
    return torch.compile(module, dynamic=False)
