"""Compile the project's Triton kernels for a CUDA GPU without one (Triton's bundled ``ptxas``):
the check that they build, which Triton's CPU interpreter (how the tests run them without a GPU)
never makes, and each kernel's shared memory.

    python -m bmojo.ops.triton_build                    # sm_90 (H100), bfloat16 attention
    python -m bmojo.ops.triton_build --capability 80 --dtype float32

Needs ``TRITON_INTERPRET`` unset: the kernels must be JIT functions, not interpreted ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import torch

from bmojo.ops import attention_triton, ssd_triton

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def argument_type(name: str, pointer_types: dict[str, str], default_pointer: str) -> str:
    """A kernel argument's Triton type, from the kernels' naming: pointers in capitals (their
    element type from ``pointer_types``, else ``default_pointer``), scalars in lower case (float
    for the scales, int otherwise)."""
    if name.isupper():
        return pointer_types.get(name, default_pointer)
    return "fp32" if name.endswith("scale") else "i32"


def compile_for_cuda(builds: Iterable[tuple], capability: int) -> list[tuple[str, int]]:
    """Each ``(kernel, constants, pointer_types, default_pointer)`` compiled to a cubin for
    compute ``capability`` (90: H100): ``(module.kernel, shared memory in bytes)`` in order."""
    import triton
    from triton.backends.compiler import GPUTarget

    if triton.knobs.runtime.interpret:
        raise RuntimeError("compiling needs the kernels as JIT functions: unset TRITON_INTERPRET")
    shared = []
    for kernel, constants, pointer_types, default_pointer in builds:
        signature = {name: "constexpr" if name in constants else argument_type(name, pointer_types, default_pointer)
                     for name in kernel.arg_names}
        compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", capability, 32))
        shared.append((f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}", compiled.metadata.shared))
    return shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability x 10 (default 90)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="the attention's inputs (the SSD computes in float32)")
    parser.add_argument("--head-dim", type=int, default=64, help="the attention's head dimension (default 64)")
    args = parser.parse_args(argv)
    if args.head_dim < 1:
        parser.error(f"--head-dim must be >= 1, got {args.head_dim}")
    builds = [*attention_triton.cuda_builds(getattr(torch, args.dtype), args.head_dim), *ssd_triton.cuda_builds()]
    for kernel, shared in compile_for_cuda(builds, args.capability):
        print(f"compiled {kernel} for sm_{args.capability}: {shared} bytes of shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
