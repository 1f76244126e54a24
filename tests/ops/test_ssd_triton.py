"""The chunked SSD's Triton kernels (bmojo.ops.ssd_triton, ``ssd_chunked(kernel="triton")``)
against the sequential reference, outputs and gradients.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py); tests/ops/test_attention_triton.py compiles every Triton kernel of the
project for a CUDA GPU (bmojo.ops.triton_build).
Skipped where triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_attention_triton import assert_triton_model_matches_torch, strided  # noqa: E402 (tests/ops, pytest's rootdir import)
from test_ssd import make_inputs, run_with_grads  # noqa: E402

from bmojo import ModelConfig  # noqa: E402
from bmojo.ops import ssd_chunked, ssd_sequential, ssd_triton  # noqa: E402

DEVICE = torch.device("cpu" if ssd_triton.INTERPRETED else "cuda")


def on_device(inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


# (l, g, chunk_size, p, n, with_init, with_d): padded last chunks, one chunk and several, both
# group counts, p and n that are not powers of two or below the 16-wide tiles, with and without
# an initial state and the D skip.
CASES = [
    (45, 2, 16, 8, 8, True, True),
    (64, 1, 32, 24, 20, False, False),
    (10, 2, 16, 16, 16, True, False),
    (100, 1, 16, 40, 8, False, True),
]


@pytest.mark.parametrize(("l", "g", "chunk_size", "p", "n", "with_init", "with_d"), CASES)
def test_kernels_match_the_sequential_scan(l, g, chunk_size, p, n, with_init, with_d):
    inputs = on_device(make_inputs(l, g, with_init=with_init, with_d=with_d, seed=l, p=p, n=n))
    y_ref, s_ref, g_ref = run_with_grads(ssd_sequential, inputs)
    y, s, grads = run_with_grads(ssd_chunked, inputs, chunk_size=chunk_size, kernel="triton")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("used", ["y", "final_state"])
def test_gradients_when_one_output_alone_is_used(used):
    """The backward gets no gradient (None, not materialised zeros) for the unused output, and
    gives the same gradients as the PyTorch scan's, which gets zeros."""
    inputs = on_device(make_inputs(40, 2, with_init=True, with_d=True, seed=8))
    grads = {}
    for kernel in ("torch", "triton"):
        leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        y, final_state = ssd_chunked(**leaves, chunk_size=16, kernel=kernel)
        loss = (y if used == "y" else final_state).square().sum()
        grads[kernel] = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    for name, grad, grad_ref in zip(inputs, grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4, msg=name)


def test_bfloat16_inputs_accumulate_in_float32():
    """As the PyTorch scan: bf16 in and out, float32 inside, the same result to bf16 rounding."""
    inputs = on_device(make_inputs(40, 2, seed=3, dtype=torch.bfloat16))
    y_ref, s_ref, _ = run_with_grads(ssd_chunked, inputs, chunk_size=16)
    y, s, _ = run_with_grads(ssd_chunked, inputs, chunk_size=16, kernel="triton")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("chunk_size", "dtype", "message"), [
    (24, torch.float32, "a chunk_size that is a power of two >= 16, got 24"),
    (8, torch.float32, "a chunk_size that is a power of two >= 16, got 8"),
    (16, torch.float64, "the Triton SSD computes in float32, got torch.float64"),
])
def test_rejects_what_the_kernels_do_not_compute(chunk_size, dtype, message):
    inputs = on_device(make_inputs(32, 1, dtype=dtype))
    with pytest.raises(ValueError, match=message):
        ssd_chunked(**inputs, chunk_size=chunk_size, kernel="triton")


def test_unknown_kernel_is_a_value_error():
    with pytest.raises(ValueError, match="unknown SSD kernel 'cuda': must be one of"):
        ssd_chunked(**make_inputs(8, 1), kernel="cuda")


@pytest.mark.parametrize("arch", ["mamba2", "bmojo", "bmojo-f"])
def test_model_with_triton_ssd_matches_the_torch_kernel(arch, count_calls):
    assert_triton_model_matches_torch(arch, {"ssd_kernel": "triton"}, [(ssd_triton, "_scan_forward")], count_calls)


def test_config_rejects_an_unknown_ssd_kernel():
    with pytest.raises(ValueError, match="ssd_kernel='cuda' is invalid"):
        ModelConfig.preset("mamba2", ssd_kernel="cuda")


@pytest.mark.parametrize("layout", [torch.Tensor.contiguous, strided])
def test_operators_pass_opcheck(layout):
    """The custom operators' schema, fake tensors (what torch.compile traces with: their strides
    too), autograd registration and AOT dispatch (torch.library.opcheck), on inputs laid out as
    ssd_chunked does and on strided ones; the backward on its own with a strided incoming gradient."""
    gen = torch.Generator().manual_seed(4)
    b, h, g, c, Q, p, n = 1, 4, 2, 3, 16, 8, 8
    x_dt, Bc, Cc = (torch.randn(*shape, generator=gen) for shape in ((b, h, c, Q, p), (b, g, c, Q, n), (b, g, c, Q, n)))
    a = -torch.rand(b, h, c, Q, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen)
    args = tuple(layout(t.to(DEVICE)).requires_grad_() for t in (x_dt, a, Bc, Cc, state))
    torch.library.opcheck(ssd_triton._scan_forward, args)
    y, final_state, entering, chunk_decay = ssd_triton._scan_forward(*(t.detach() for t in args))
    d_y, d_final = layout(torch.randn_like(y)), layout(torch.randn_like(final_state))
    torch.library.opcheck(ssd_triton._scan_backward, (d_y, d_final, *(t.detach() for t in args[:4]), entering,
                                                       chunk_decay))


def test_compiled_graph_holds_the_kernels_whole():
    """Under torch.compile (fullgraph: no break) the operator is one node of the graph: the same
    output, final state and gradients as eagerly (to rounding in the PyTorch ops around it)."""
    inputs = on_device(make_inputs(45, 2, with_init=True, with_d=True, seed=6))
    compiled = torch.compile(ssd_chunked, backend="aot_eager", fullgraph=True)
    y, s, grads = run_with_grads(compiled, inputs, chunk_size=16, kernel="triton")
    y_ref, s_ref, grads_ref = run_with_grads(ssd_chunked, inputs, chunk_size=16, kernel="triton")
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    for name in grads_ref:  # AOT autograd may reorder the PyTorch ops' reductions (D's gradient)
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
