"""The union attention's Triton kernels (bmojo.ops.attention_triton) against the dense reference,
outputs and gradients.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which
tests/conftest.py sets: the same kernel code, executed with NumPy on the CPU), and a
separate process compiles them for a CUDA GPU (sm_90) with Triton's bundled ``ptxas``, which the
interpreter never does. Skipped where triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from test_attention import assert_same, make_inputs, run_with_grads  # noqa: E402 (tests/ops, pytest's rootdir import)

from bmojo import LanguageModel, ModelConfig  # noqa: E402
from bmojo.ops import attention_triton  # noqa: E402
from bmojo.ops.attention import union_attention_reference  # noqa: E402
from bmojo.ops.attention_triton import INTERPRETED, union_attention_triton  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")

# (l, window, fading_span, capacity, chunk_size, hkv, dh): lengths that are not a multiple of the
# tiles (32 rows in float32 up to 64-dim heads, 16 beyond), chunks smaller than a tile, as large
# and larger, head dimensions that are not a power of two, both GQA ratios, no fading tokens and
# no memory.
CASES = [
    (77, 9, 5, 6, 16, 2, 24),
    (40, 3, 2, 4, 4, 1, 8),
    (130, 20, 40, 70, 128, 2, 16),
    (70, 40, 0, 5, 32, 4, 8),
    (65, 7, 3, None, 8, 2, 8),
    (33, 1, 1, 3, 5, 2, 8),
    (40, 6, 5, 4, 16, 2, 100),  # padded to 128 dims: float32 takes 16-row tiles
]


def on_device(inputs: dict[str, torch.Tensor | None], dtype: torch.dtype = torch.float32) -> dict:
    return {n: None if t is None else t.to(DEVICE, t.dtype if n == "mem_pos" else dtype) for n, t in inputs.items()}


@pytest.mark.parametrize(("l", "window", "fading_span", "capacity", "chunk_size", "hkv", "dh"), CASES)
def test_kernels_match_reference(l, window, fading_span, capacity, chunk_size, hkv, dh):
    inputs = on_device(make_inputs(l, hkv, fading_span, capacity, chunk_size, seed=l + window, dh=dh))
    _, g_ref = assert_same(inputs, atol=1e-5, fast=union_attention_triton, window=window, fading_span=fading_span,
                           chunk_size=chunk_size)
    if capacity:
        assert g_ref["mem_v"].abs().sum() > 0  # the memory was seen by some query


def test_memory_scored_with_q_sums_both_gradients():
    inputs = on_device(make_inputs(50, 2, 3, 5, 8, seed=5, with_q_mem=False))
    assert_same(inputs, fast=union_attention_triton, window=4, fading_span=3, chunk_size=8)


@pytest.mark.parametrize(("wanted", "launches"), [
    (("q",), {"_backward_query": 1}),
    (("kf",), {"_backward_keys": 1}),
    (("k", "mem_v"), {"_backward_keys": 1, "_backward_memory": 1}),
    (("q_mem",), {"_backward_query": 1}),
])
def test_backward_runs_only_the_kernels_of_the_inputs_that_need_a_gradient(wanted, launches, monkeypatch):
    """Only ``wanted`` require grad: their gradients equal the reference's, and the backward
    launches the kernels that make them and no other."""
    inputs = on_device(make_inputs(45, 2, 5, 6, 16, seed=11))
    counts = {}
    for name in ("_backward_query", "_backward_keys", "_backward_memory"):
        kernel = getattr(attention_triton, name)

        class Counted:  # kernel[grid](...) as Triton launches it, counted
            def __getitem__(self, grid, name=name, kernel=kernel):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]

        monkeypatch.setattr(attention_triton, name, Counted())
    grads = {}
    for fn in (union_attention_reference, union_attention_triton):
        leaves = {n: t if t is None or n not in wanted else t.clone().requires_grad_() for n, t in inputs.items()}
        out = fn(**leaves, window=4, fading_span=5, chunk_size=16)
        grads[fn] = torch.autograd.grad(out.square().sum(), [leaves[n] for n in wanted])
    for name, grad, grad_ref in zip(wanted, grads[union_attention_triton], grads[union_attention_reference],
                                    strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4, msg=name)
    assert counts == launches


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a layout that is not contiguous (the last two dimensions' strides swapped)."""
    return t.mT.contiguous().mT


@pytest.mark.parametrize("layout", [torch.Tensor.contiguous, strided])
@pytest.mark.parametrize(("fading_span", "capacity"), [(3, 4), (0, None)])
def test_operators_pass_opcheck(fading_span, capacity, layout):
    """The custom operators' schema, fake tensors (what torch.compile traces with: their strides
    too), autograd registration and AOT dispatch (torch.library.opcheck), with every key set and
    with none, on contiguous inputs and on strided ones; the backward on its own with a strided
    incoming gradient."""
    inputs = make_inputs(40, 2, fading_span, capacity, 16, seed=1)
    leaves = [None if inputs[n] is None else layout(inputs[n].to(DEVICE)).requires_grad_()
              for n in ("q", "k", "v", "kf", "vf", "q_mem", "mem_k", "mem_v")]
    mem_pos = None if capacity is None else inputs["mem_pos"].to(DEVICE)
    settings = (4, fading_span, 16, 0.125)  # window, fading_span, chunk_size, scale
    torch.library.opcheck(attention_triton._attention_forward, (*leaves, mem_pos, *settings))
    tensors = [None if t is None else t.detach() for t in (*leaves, mem_pos)]
    out, lse = attention_triton._attention_forward(*tensors, *settings)
    needs = [True] * attention_triton.GRAD_INPUTS
    torch.library.opcheck(attention_triton._attention_backward,
                          (layout(torch.randn_like(out)), *tensors, out, lse, *settings, needs))


def test_strided_inputs_give_the_contiguous_result():
    """The operators make their inputs contiguous: q, k, v, kf, vf and the memory laid out
    otherwise (so saved for the backward too) give the same output and gradients, bit for bit."""
    inputs = on_device(make_inputs(40, 2, 3, 4, 16, seed=7))

    def operator(q, k, v, kf, vf, mem_k, mem_v, mem_pos, q_mem):
        return attention_triton._attention_forward(q, k, v, kf, vf, q_mem, mem_k, mem_v, mem_pos, 4, 3, 16, 0.125)[0]

    results = []
    for layout in (torch.Tensor.contiguous, strided):
        laid_out = {name: None if t is None else layout(t) for name, t in inputs.items()}
        results.append(run_with_grads(operator, laid_out))
    (out, grads), (out_strided, grads_strided) = results
    torch.testing.assert_close(out_strided, out, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_strided[name], grads[name], atol=0, rtol=0, msg=name)


def test_no_gradient_for_the_output_is_no_gradient_for_the_inputs():
    """Autograd may hand the backward ``None`` for the output (a later Function returning no
    gradient); the inputs then get none from the attention."""
    inputs = on_device(make_inputs(20, 2, 0, None, 16, seed=3))
    q, k, v = (inputs[name].clone().requires_grad_() for name in ("q", "k", "v"))

    class DropsGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    out = DropsGradient.apply(union_attention_triton(q, k, v, window=4, chunk_size=16))
    assert torch.autograd.grad(out.sum() + q.sum(), [q, k, v], allow_unused=True)[1:] == (None, None)


def test_compiled_graph_holds_the_kernels_whole():
    """Under torch.compile (fullgraph: no break) the operator is one node of the graph: the same
    output and gradients as eagerly (to rounding in the PyTorch ops around it)."""
    inputs = on_device(make_inputs(45, 2, 3, 4, 16, seed=2))
    compiled = torch.compile(union_attention_triton, backend="aot_eager", fullgraph=True)
    out, grads = run_with_grads(compiled, inputs, window=4, fading_span=3, chunk_size=16)
    out_ref, grads_ref = run_with_grads(union_attention_triton, inputs, window=4, fading_span=3, chunk_size=16)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    for name in grads_ref:  # AOT autograd may reorder the PyTorch ops' reductions (D's gradient)
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_full_causal_without_window():
    inputs = on_device(make_inputs(70, 2, 0, None, 16, seed=9))
    assert_same(inputs, fast=union_attention_triton, window=None, chunk_size=16)


@pytest.fixture
def bf16_dot_in_interpreter(monkeypatch):
    """Triton 3.9's interpreter multiplies bfloat16 operands of ``tl.dot`` as their raw uint16 bits
    (it widens only 8-bit floats): widen bfloat16 to float32 first, exactly (a 16-bit shift), so
    the kernels' bfloat16 code (loads, casts of probabilities and stores) runs on the CPU."""
    if not INTERPRETED:
        return
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype != triton.language.bfloat16:
            return t
        return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), triton.language.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest))


def test_bfloat16_matches_reference_within_bfloat16_rounding(bf16_dot_in_interpreter):
    """bf16 inputs: the reference computes in float32 from the same bf16 values; the kernels
    round the probabilities to bf16 before their products with v (as flash attention does)."""
    inputs = on_device(make_inputs(77, 2, 5, 6, 16, seed=11, dh=32), torch.bfloat16)
    kwargs = dict(window=9, fading_span=5, chunk_size=16)
    out_ref, g_ref = run_with_grads(union_attention_reference, inputs, **kwargs)
    out, grads = run_with_grads(union_attention_triton, inputs, **kwargs)
    assert out.dtype == torch.bfloat16
    for name, value, expected in [("out", out, out_ref), *((n, grads[n], g_ref[n]) for n in g_ref)]:
        relative = (value.float() - expected.float()).norm() / expected.float().norm()
        assert relative < 1e-2, (name, relative.item())


def test_autocast_casts_every_input_to_its_dtype(bf16_dot_in_interpreter):
    """Under autocast, mixed inputs (a float32 query from a norm, bf16 keys) run in autocast's
    dtype, as the PyTorch ops' matmuls would: the result of all-bf16 inputs."""
    inputs = on_device(make_inputs(40, 2, 3, 4, 8, seed=4))
    kwargs = dict(window=5, fading_span=3, chunk_size=8)
    mixed = {n: t if t is None or n in ("q", "mem_pos") else t.to(torch.bfloat16) for n, t in inputs.items()}
    with torch.autocast(DEVICE.type, torch.bfloat16):
        out = union_attention_triton(**mixed, **kwargs)
    in_bf16 = {n: t if t is None or n == "mem_pos" else t.to(torch.bfloat16) for n, t in inputs.items()}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, union_attention_triton(**in_bf16, **kwargs), atol=0, rtol=0)


def test_rejects_mixed_dtypes():
    inputs = on_device(make_inputs(16, 2, 0, None, 8))
    inputs["k"] = inputs["k"].double()
    with pytest.raises(ValueError, match="one dtype"):
        union_attention_triton(**inputs, window=4, chunk_size=8)


def test_rejects_keys_that_do_not_match_the_queries():
    inputs = on_device(make_inputs(16, 2, 0, None, 8))
    inputs["k"], inputs["v"] = inputs["k"][:, :12], inputs["v"][:, :12]
    with pytest.raises(ValueError, match="k, v must be"):
        union_attention_triton(**inputs, window=4, chunk_size=8)


def test_rejects_memory_without_window():
    inputs = on_device(make_inputs(16, 2, 0, 4, 8))
    with pytest.raises(ValueError, match="finite window"):
        union_attention_triton(**inputs, window=None, chunk_size=8)


# Several attention chunks past W + F + M, as tests/models/test_lm.py's tiny models, and two SSD
# chunks (bmojo.ops.ssd.SSD_CHUNK_SIZE = 32) in the 45-token sequence of the model tests.
TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=4, fading_span=3,
            chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0)


def assert_triton_model_matches_torch(arch: str, triton_fields: dict[str, str], ops: list[tuple], count_calls) -> None:
    """``arch`` with ``triton_fields`` (e.g. ``attention_kernel="triton"``) gives the same logits,
    auxiliary loss and parameter gradients as with the PyTorch ops, and each of ``ops`` (``(module,
    name)``: a Triton operator) runs once per layer. The innovation predictor is random, not its
    zero init (where ties would decide the selected tokens)."""
    torch.manual_seed(0)
    models = {"torch": LanguageModel(ModelConfig.preset(arch, **TINY)).to(DEVICE),
              "triton": LanguageModel(ModelConfig.preset(arch, **TINY, **triton_fields)).to(DEVICE)}
    with torch.no_grad():
        for name, param in models["torch"].named_parameters():
            if ".predictor." in name:
                param.normal_(0.0, 0.3)
    models["triton"].load_state_dict(models["torch"].state_dict())
    calls = {}
    for module, name in ops:
        calls = count_calls(module, name)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for name, model in models.items():
        out = model(tokens)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        names = [param_name for param_name, _ in model.named_parameters()]
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
        results[name] = (out.logits, out.aux_loss, dict(zip(names, grads, strict=True)))
    (logits, aux, grads), (logits_ref, aux_ref, grads_ref) = results["triton"], results["torch"]
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux, aux_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert calls == {name: TINY["n_layers"] for _, name in ops}  # from the triton model only


@pytest.mark.parametrize("arch", ["bmojo", "bmojo-f", "swa"])
def test_model_with_triton_attention_matches_the_torch_kernel(arch, count_calls):
    assert_triton_model_matches_torch(arch, {"attention_kernel": "triton"}, [(attention_triton, "_attention_forward")],
                                      count_calls)


def test_model_with_every_triton_kernel_matches_the_torch_ops(count_calls):
    from bmojo.ops import ssd_triton

    assert_triton_model_matches_torch("bmojo", {"attention_kernel": "triton", "ssd_kernel": "triton"},
                                      [(attention_triton, "_attention_forward"), (ssd_triton, "_scan_forward")],
                                      count_calls)


@pytest.mark.parametrize("arch", ["swa", "bmojo"])
def test_chunked_prefill_runs_the_kernels_and_matches_one_pass(arch, count_calls):
    """A prompt fed in pieces through the cache (each piece continuing the last): the logits of
    the PyTorch ops' single pass, with the Triton kernels in every windowed layer of every piece."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset(arch, **TINY)).to(DEVICE)
    chunked = LanguageModel(ModelConfig.preset(arch, **TINY, attention_kernel="triton")).to(DEVICE)
    chunked.load_state_dict(model.state_dict())
    calls = count_calls(attention_triton, "_attention_forward")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ends = (9, 22, 40)  # the last two pieces continue a used cache
    with torch.no_grad():
        full = model(tokens).logits
        cache, start, pieces = chunked.new_cache(2, DEVICE), 0, []
        for end in ends:
            pieces.append(chunked(tokens[:, start:end], cache).logits)
            start = end
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert calls == {"_attention_forward": len(ends) * TINY["n_layers"]}


def test_compiled_model_with_every_triton_kernel_matches_eager(assert_compiles_to_eager):
    """The whole model under torch.compile with both kernels, in one graph (the kernels break
    none): the eager model's logits and parameter gradients."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("bmojo", **TINY, attention_kernel="triton",
                                             ssd_kernel="triton")).to(DEVICE)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_compiles_to_eager(model, tokens)


def test_config_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="attention_kernel='cuda' is invalid"):
        ModelConfig.preset("bmojo", attention_kernel="cuda")


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")),
                    reason="this triton has no CUDA backend")
def test_every_triton_kernel_compiles_for_a_cuda_gpu():
    """The interpreter never runs Triton's compiler: compile the attention's and the SSD's kernels
    to cubins for sm_90 (bmojo.ops.triton_build), in a process without TRITON_INTERPRET."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-m", "bmojo.ops.triton_build", "--capability", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("compiled")]
    assert compiled == [*(f"attention_triton.{k}" for k in ("_forward", "_backward_query", "_backward_keys",
                                                             "_backward_memory")),
                        *(f"ssd_triton.{k}" for k in ("_chunk_state", "_chunk_output", "_chunk_output_backward",
                                                      "_chunk_state_backward", "_chunk_recurrence",
                                                      "_chunk_recurrence"))], done.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")),
                    reason="this triton has no CUDA backend")
def test_widest_heads_fit_the_shared_memory_of_every_cuda_gpu_since_sm_80():
    """float32 inputs with 256-dim heads, the attention's largest tiles in bytes, compiled for an
    RTX 30 (sm_86, 99 KB of shared memory per block, the least of sm_80 to sm_90)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-m", "bmojo.ops.triton_build", "--capability", "86", "--dtype",
                           "float32", "--head-dim", "256"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = {line.split()[1]: int(line.split()[4]) for line in done.stdout.splitlines()
              if line.startswith("compiled attention")}
    assert len(shared) == 4 and max(shared.values()) <= 99 * 1024, shared
