import importlib
import os

import pytest
import torch

from bmojo.compilation import require_cxx_compiler
from bmojo.device import KERNEL_MODULES

if not torch.cuda.is_available():
    # Triton's kernels (tests/ops/test_attention_triton.py) run in its CPU interpreter here. The
    # flag is read when a kernel is defined, triton.language's own helpers included, so it is set
    # before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cxx: needs a C++ compiler (torch.compile on CPU builds C++)")


def pytest_collection_modifyitems(config, items):
    try:
        require_cxx_compiler("tests")
    except ValueError as err:
        skip = pytest.mark.skip(reason=str(err))
        for item in items:
            if "requires_cxx" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def saved_for_backward():
    """``saved_for_backward(fn, *inputs)`` runs ``fn(*inputs)`` and returns what autograd keeps
    for its backward: one tensor per distinct storage, the inputs' own storages left out."""

    def saved(fn, *inputs) -> list[torch.Tensor]:
        own = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        kept: dict[int, torch.Tensor] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                kept.setdefault(t.untyped_storage().data_ptr(), t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*inputs)
        return list(kept.values())

    return saved


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name)`` wraps ``module.name`` for this test and returns the dict of
    call counts by name that every wrapped function adds to (the Triton ops, called through
    their modules' globals)."""
    counts: dict[str, int] = {}

    def wrap(module, name: str) -> dict[str, int]:
        original = getattr(module, name)
        counts[name] = 0

        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        return counts

    return wrap


@pytest.fixture
def assert_op_compiles_to_eager():
    """``assert_op_compiles_to_eager(fn, inputs, d_out, output_tol=(1e-6, 1e-6), grad_tol=(1e-6, 1e-6))``:
    ``fn(*inputs)`` under ``torch.compile`` (one graph, AOT autograd, no C++ compiler needed) gives
    the eager output and the gradients of every input against ``d_out``, to ``(atol, rtol)``.
    Hand-written backwards are in that graph (pytorch/pytorch#180642: a Function whose forward
    modified its output in place compiled to wrong gradients in PyTorch 2.11)."""

    def check(fn, inputs, d_out, output_tol=(1e-6, 1e-6), grad_tol=(1e-6, 1e-6)) -> None:
        results = []
        torch.compiler.reset()
        for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
            out = run(*inputs)
            results.append((out, torch.autograd.grad(out, inputs, d_out)))
        torch.compiler.reset()
        (out_ref, grads_ref), (out, grads) = results
        torch.testing.assert_close(out, out_ref, atol=output_tol[0], rtol=output_tol[1])
        for index, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
            torch.testing.assert_close(grad, grad_ref, atol=grad_tol[0], rtol=grad_tol[1],
                                       msg=lambda m, index=index: f"gradient of input {index}: {m}")

    return check


@pytest.fixture
def assert_compiles_to_eager():
    """``assert_compiles_to_eager(model, tokens)``: the model under ``torch.compile`` (one graph,
    AOT autograd, no C++ compiler needed) gives the eager logits and every parameter's gradient of
    ``logsumexp(logits).mean() + aux_loss``. Hand-written backwards are in that graph; PyTorch
    2.11 compiled a Function whose forward modified its output in place to wrong gradients
    (pytorch/pytorch#180642)."""

    def check(model, tokens) -> None:
        results = []
        torch.compiler.reset()
        for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
            out = run(tokens)
            loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
            results.append((out.logits, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True,
                                                            materialize_grads=True)))
        torch.compiler.reset()
        (logits_ref, grads_ref), (logits, grads) = results
        torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-5)
        for (name, _), grad, grad_ref in zip(model.named_parameters(), grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    return check


@pytest.fixture
def triton_without_interpreter(monkeypatch):
    """Triton as a run outside the tests sees it: no CPU interpreter, its setting and the kernel
    modules (which read it at their import) both say so. The modules are imported first, with the
    interpreter: their kernels stay defined for the CPU for the tests that follow."""
    triton = pytest.importorskip("triton")
    for name in KERNEL_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "INTERPRETED", False)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    return triton
